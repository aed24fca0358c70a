"""Device and dtype choices, in one neutral module (engine, build and tools import it; it imports only torch)."""
from __future__ import annotations

import torch
from torch import nn


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for but CUDA is not available; use device='cpu' or 'auto'")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype: those of the first floating-point parameter or buffer that is not FP8."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and tensor.element_size() > 1:
            return tensor.device, tensor.dtype
    raise ValueError("the model has no floating-point parameters; cannot tell its compute dtype")


def gpu_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; None for the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory
