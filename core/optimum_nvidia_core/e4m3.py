"""The FP8 (e4m3) format and its rounding: the one definition every quantizing path uses.

Quantizing means ``clamp(x / s, -448, 448).to(float8_e4m3fn)``: IEEE division, saturation to the largest finite
e4m3 value, round-to-nearest-even. torch does it the same on the CPU and the GPU, and the Triton kernels read these
constants (``kernels.fp8_quant``, ``kernels.paged_attention``), so the CPU path is a faithful emulation of the GPU one.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Smallest scale we allow: keeps an all-zero row or tensor from dividing by zero.
MIN_SCALE = 1e-12


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to +-448 and rounded to e4m3. ``scale`` broadcasts against ``x`` (fp32)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def absmax_scale(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The scale that maps the absolute maximum of x (over ``dim``, or all of x) to 448, as fp32."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)
