"""SiLU(gate) * up over the fused gate_up projection, in one pass.

Numerics follow transformers' LlamaMLP in bf16: silu is computed in fp32 and rounded, then the product is rounded.
Feeding an FP8 down projection, the kernel also quantizes that rounded row for it (with a dynamic per-row scale,
one program per whole row, so the scale is known before anything is stored).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimum_nvidia_core.kernels.fp8_quant import MAX_FUSED_WIDTH, fp8_output, quantize_row


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, row_scale_ptr, static_scale_ptr, inter, stride_x, stride_o,
                         QUANTIZE: tl.constexpr, DYNAMIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
    out = (act * up).to(x_ptr.dtype.element_ty)
    if QUANTIZE:  # a dynamic scale: BLOCK covers the whole row
        out, scale = quantize_row(out.to(tl.float32), mask, static_scale_ptr, DYNAMIC)
        if tl.program_id(1) == 0:
            tl.store(row_scale_ptr + row, scale)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, quantize: bool = False,
                 input_scale: torch.Tensor | None = None):
    """x [T, 2 * I] = [gate | up] -> silu(gate) * up [T, I]. With ``quantize``: (e4m3 [T, I], fp32 scale per
    row [T]) for the FP8 linear it feeds (its static ``input_scale`` [1], or dynamic per row when None)."""
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] % 2:
        raise ValueError("silu_and_mul wants x [T, 2 * intermediate] (gate then up) with unit stride along it")
    num_rows, inter = x.shape[0], x.shape[1] // 2
    if quantize and inter > MAX_FUSED_WIDTH:
        raise ValueError(f"silu_and_mul quantizes rows of at most {MAX_FUSED_WIDTH} values (got {inter}); "
                         "quantize its output with kernels.quantize_fp8 instead")
    row_scale = None
    if quantize and input_scale is None:  # a dynamic scale needs the whole row in one program
        out, row_scale = fp8_output(num_rows, inter, x.device)
        block, num_warps = triton.next_power_of_2(inter), 16
    elif quantize:
        out, row_scale = fp8_output(num_rows, inter, x.device)
        block, num_warps = 1024, 4
    else:
        out = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device) if out is None else out
        block, num_warps = 1024, 4
    scale_arg = input_scale if input_scale is not None else x  # unread unless static quantization
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        x, out, row_scale if quantize else x, scale_arg, inter, x.stride(0), out.stride(0),
        QUANTIZE=quantize, DYNAMIC=input_scale is None, BLOCK=block, num_warps=num_warps,
    )
    return (out, row_scale) if quantize else out
