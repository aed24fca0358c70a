"""Read a safetensors file straight onto a device: one pass over the file into a staging buffer (pinned on CUDA,
so the copies to the GPU are DMA, asynchronous, overlapped with the next read), each tensor allocated once on the
device. ``safetensors.torch.load_file(device="cuda")`` instead faults the memory-mapped pages in, copies them into
pageable host tensors, and the driver stages those again before the transfer. (On the CPU, load_file's memory map
is better: it copies nothing until a tensor is used.) benchmarks/build_bench.py times both on the GPU.

The result is what ``load_file`` gives, byte for byte (tests/unit/test_safetensors_reader.py), for the layout of the
format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CHUNK_BYTES = 64 << 20  # per staging buffer (two of them)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[dict, int]:
    """({name: entry}, offset of the data section); raises ValueError for a file that is not safetensors."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        size = Path(path).stat().st_size
        if not 0 < length <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {length}, file size {size})")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def load_to_device(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """{name: tensor on ``device``} for every tensor of the safetensors file ``path``."""
    device = torch.device(device)
    header, data_start = read_header(path)
    tensors, spans = {}, []  # spans: (begin, end, flat uint8 view of the destination), file offsets
    for name, entry in header.items():
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this reader does not know")
        tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]], device=device)
        begin, end = entry["data_offsets"]
        if end - begin != tensor.numel() * tensor.element_size():
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {entry['shape']}")
        tensors[name] = tensor
        if end > begin:
            spans.append((data_start + begin, data_start + end, tensor.view(-1).view(torch.uint8)))
    spans.sort(key=lambda span: span[0])
    if spans and spans[-1][1] > Path(path).stat().st_size:
        raise ValueError(f"{path} is shorter than its header says ({spans[-1][1]} bytes): truncated")
    if device.type == "cuda":
        with torch.cuda.device(device):  # the copies and the events on that device's stream
            _fill(path, spans, device)
    else:
        _fill(path, spans, device)
    return tensors


def _fill(path: Path, spans: list[tuple[int, int, torch.Tensor]], device: torch.device) -> None:
    """Copy the file's bytes into each span's destination, one chunk at a time through two staging buffers."""
    if not spans:
        return
    cuda = device.type == "cuda"
    buffers = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    done = [None, None]  # CUDA events: the copies out of each buffer have finished
    first, last = spans[0][0], spans[-1][1]
    k = 0  # the first span not yet completely copied
    with open(path, "rb", buffering=0) as f:
        f.seek(first)
        for i, chunk_start in enumerate(range(first, last, CHUNK_BYTES)):
            buffer = buffers[i % 2]
            if done[i % 2] is not None:
                done[i % 2].synchronize()  # its previous copies are out before it is overwritten
            chunk_end = min(chunk_start + CHUNK_BYTES, last)
            view = memoryview(buffer.numpy())[:chunk_end - chunk_start]
            got = 0
            while got < len(view):  # readinto may return less than asked
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{path} ended at byte {chunk_start + got}, before its tensors did: truncated")
                got += n
            while k < len(spans) and spans[k][0] < chunk_end:
                begin, end, target = spans[k]
                lo, hi = max(begin, chunk_start), min(end, chunk_end)
                target[lo - begin:hi - begin].copy_(buffer[lo - chunk_start:hi - chunk_start], non_blocking=cuda)
                if end > chunk_end:
                    break  # continues in the next chunk
                k += 1
            if cuda:
                done[i % 2] = torch.cuda.Event()
                done[i % 2].record()
    if cuda:
        torch.cuda.current_stream(device).synchronize()  # the last copies, before the buffers are freed
