"""SiLU(gate) * up over the fused gate_up projection, in one pass.

Numerics follow transformers' LlamaMLP in bf16: silu is computed in fp32 and rounded, then the product is rounded.
Feeding an FP8 down projection with a static input scale, the kernel also quantizes that rounded value for it.
(A dynamic per-row scale would need a whole row per program, which is slower than SiLU*mul followed by
kernels.quantize_fp8, so it is not offered; benchmarks/NOTES.md has the measurement.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimum_nvidia_core.kernels.fp8_quant import fp8_output, quantize_row


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, row_scale_ptr, static_scale_ptr, inter, stride_x, stride_o,
                         QUANTIZE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
    out = (act * up).to(x_ptr.dtype.element_ty)
    if QUANTIZE:
        out, scale = quantize_row(out.to(tl.float32), mask, static_scale_ptr, False)
        if tl.program_id(1) == 0:
            tl.store(row_scale_ptr + row, scale)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, input_scale: torch.Tensor | None = None):
    """x [T, 2 * I] = [gate | up] -> silu(gate) * up [T, I]. With the static ``input_scale`` [1] of the FP8
    linear it feeds: (e4m3 [T, I], fp32 scale per row [T]) instead."""
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] % 2:
        raise ValueError("silu_and_mul wants x [T, 2 * intermediate] (gate then up) with unit stride along it")
    num_rows, inter = x.shape[0], x.shape[1] // 2
    quantize = input_scale is not None
    row_scale = None
    if quantize:
        out, row_scale = fp8_output(num_rows, inter, x.device)
    elif out is None:
        out = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        x, out, row_scale if quantize else x, input_scale if quantize else x, inter, x.stride(0), out.stride(0),
        QUANTIZE=quantize, BLOCK=block, num_warps=4,
    )
    return (out, row_scale) if quantize else out
