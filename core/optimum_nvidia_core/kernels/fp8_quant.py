"""Activation quantization for the FP8 linears, once per linear and before its GEMM.

x [M, K] (bf16/fp16) -> (e4m3 [M, K], fp32 scale per row [M]). A static scale (calibrated, one per tensor) and
dynamic ones (absmax of each row / 448) come out in the same form, so the GEMMs after it take one input format.
Rounding as e4m3.quantize_fp8: IEEE division (div_rn), saturate to +-448, round to nearest even.

Why before the GEMM: quantizing inside it repeats the division in every program that reads the row, which makes
decode GEMMs several times slower than the same GEMM on a pre-quantized input (benchmarks/NOTES.md).
Where a norm or SiLU*mul feeds an FP8 linear, their kernels quantize their own output with `quantize_row`
(no separate pass at all); this kernel serves the other inputs (the attention output before o_proj).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimum_nvidia_core import e4m3

FP8_MAX = tl.constexpr(e4m3.FP8_MAX)
MIN_SCALE = tl.constexpr(e4m3.MIN_SCALE)  # an all-zero row must not divide by zero
MAX_FUSED_WIDTH = 16384  # rows up to this wide are quantized whole in registers by the fused kernels


@triton.jit
def quantize_row(y, mask, static_scale_ptr, DYNAMIC: tl.constexpr):
    """A whole row y fp32 [BLOCK] (lanes off `mask` ignored) -> (e4m3 [BLOCK], its fp32 scale)."""
    if DYNAMIC:
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), 0)
        scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), MIN_SCALE)
    else:
        scale = tl.load(static_scale_ptr)
    return tl.clamp(tl.math.div_rn(y, scale), -FP8_MAX, FP8_MAX).to(tl.float8e4nv), scale


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, row_scale_ptr, static_scale_ptr, K, stride_x, stride_o,
                     DYNAMIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    if DYNAMIC:
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, 0), FP8_MAX), MIN_SCALE)
    else:
        scale = tl.load(static_scale_ptr)
    tl.store(row_scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0)
        q = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + row * stride_o + k0 + cols, q.to(out_ptr.dtype.element_ty), mask=k0 + cols < K)


def fp8_output(rows: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers a quantizing kernel writes: e4m3 [rows, width] and the fp32 scale of each row [rows]."""
    return (torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(rows, dtype=torch.float32, device=device))


def quantize_fp8(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 [M] scale of each row). input_scale: fp32 [1] (static) or None (dynamic)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("quantize_fp8 wants x [M, K] with unit stride along K; call .contiguous() first")
    m, k = x.shape
    out, row_scale = fp8_output(m, k, x.device)
    block = min(triton.next_power_of_2(k), 2048)
    _quantize_kernel[(m,)](
        x, out, row_scale, input_scale if input_scale is not None else row_scale, k, x.stride(0), out.stride(0),
        DYNAMIC=input_scale is None, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return out, row_scale
