"""build/safetensors_reader.py gives what safetensors' own load_file gives, byte for byte, whatever the chunking."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from optimum_nvidia_core.build import safetensors_reader


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.fp8": (torch.randn(33, 17, generator=g) * 50).to(torch.float8_e4m3fn),
        "w.bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "s.f32": torch.randn(33, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "ids": torch.arange(11, dtype=torch.int64),
        "mask": torch.rand(9, generator=g) > 0.5,
        "h.f16": torch.randn(3, 3, 3, generator=g).half(),
    }


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])  # tensors split across many chunks, or all in one
def test_same_bytes_as_load_file(tensors, tmp_path, monkeypatch, chunk):
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    monkeypatch.setattr(safetensors_reader, "CHUNK_BYTES", chunk)
    ours, theirs = safetensors_reader.load_to_device(path, "cpu"), load_file(str(path))
    assert set(ours) == set(theirs) == set(tensors)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name


def test_a_truncated_or_foreign_file_is_an_error(tensors, tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    os.truncate(path, path.stat().st_size - 3)
    with pytest.raises(ValueError, match="truncated"):
        safetensors_reader.load_to_device(path, "cpu")
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_reader.load_to_device(path, "cpu")
