"""Activation quantization for the FP8 linears, once per linear and before its GEMM.

x [M, K] (bf16/fp16) -> (e4m3 [M, K], fp32 scale per row [M]). A static scale (calibrated, one per tensor) and
dynamic ones (absmax of each row / 448) come out in the same form, so the GEMMs after it take one input format.
Rounding as layers.fp8_linear.quantize_fp8: IEEE division (div_rn), saturate to +-448, round to nearest even.

Why a separate pass: quantizing inside the GEMM repeats the division in every program that reads the row, and
on an H100 that made decode GEMMs 2-10x slower than the same GEMM on a pre-quantized input
(benchmarks/NOTES.md, "FP8 GEMM, third pass").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
MIN_SCALE = tl.constexpr(1e-12)  # layers.fp8_linear.MIN_SCALE: an all-zero row must not divide by zero


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


def quantize_fp8(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 [M] scale of each row). input_scale: fp32 [1] (static) or None (dynamic)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("quantize_fp8 wants x [M, K] with unit stride along K; call .contiguous() first")
    m, k = x.shape
    out = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(k), 2048)
    _quantize_kernel[(m,)](
        x, out, row_scale, input_scale if input_scale is not None else row_scale, k, x.stride(0), out.stride(0),
        DYNAMIC=input_scale is None, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return out, row_scale
