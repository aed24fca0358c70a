"""The engine options' device and dtype, with 'auto' resolved: one rule for the engine and the FP8 builder, which
must agree (an engine is built for the device and dtype it will run in)."""
from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """'auto' is the GPU when CUDA is available, else the CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for but CUDA is not available; use device='cpu' or 'auto'")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on the CPU (where bf16 matmuls are slow and less exact)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
