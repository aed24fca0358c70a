"""build/safetensors_reader.py on the GPU (pinned double-buffered copies): the same bytes as safetensors' load_file."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from optimum_nvidia_core.build import safetensors_reader


@pytest.mark.parametrize("chunk", [4096, 1 << 20, 64 << 20])  # many chunks through both buffers, or one
def test_same_bytes_as_load_file_on_the_gpu(tmp_path, monkeypatch, chunk):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": (torch.randn(257, 129, generator=g) * 40).to(torch.float8_e4m3fn) for i in range(6)}
    tensors.update({"b": torch.randn(1000, generator=g).bfloat16(), "s": torch.tensor(2.0)})
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    monkeypatch.setattr(safetensors_reader, "CHUNK_BYTES", chunk)
    ours, theirs = safetensors_reader.load_to_device(path, "cuda"), load_file(str(path), device="cuda")
    for name, tensor in theirs.items():
        assert ours[name].is_cuda and ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape
        assert torch.equal(ours[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name
