"""Shared checks for the GPU tests: float64 relative error and poisoned outputs."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run by Triton's CPU interpreter


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out holds NaN or inf."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp(min=1e-30)).item()


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or the max value for integer/fp8 types) so unwritten elements fail the check."""
    if t.dtype.is_floating_point and t.dtype != torch.float8_e4m3fn:
        return t.fill_(float("nan"))
    return t.fill_(torch.finfo(t.dtype).max if t.dtype.is_floating_point else torch.iinfo(t.dtype).max)


# Triton's interpreter multiplies bf16 tiles wrongly (it treats them as integers); fp16 exercises the same code.
DTYPE = torch.float16 if INTERPRET else torch.bfloat16
