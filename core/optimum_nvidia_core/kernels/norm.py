"""RMSNorm, optionally fused with the residual add before it: one read and one write per row instead of five.

Numerics follow transformers' LlamaRMSNorm: the residual sum is rounded to the compute dtype (it is the new
residual stream), the statistics are fp32, the normalized row is rounded to the compute dtype, then multiplied by
the weight and rounded again. Feeding an FP8 linear, the kernel also quantizes that rounded row for it
(kernels.fp8_quant numerics: the same bytes as a separate quantize pass, one kernel fewer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimum_nvidia_core.kernels.fp8_quant import MAX_FUSED_WIDTH, fp8_output, quantize_row


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, row_scale_ptr, static_scale_ptr,
                     hidden, eps, stride_x, stride_r, stride_o, stride_ro, HAS_RESIDUAL: tl.constexpr,
                     QUANTIZE: tl.constexpr, DYNAMIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = (normed * weight).to(x_ptr.dtype.element_ty)
    if QUANTIZE:
        out, scale = quantize_row(out.to(tl.float32), mask, static_scale_ptr, DYNAMIC)
        tl.store(row_scale_ptr + row, scale)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, quantize: bool = False,
             input_scale: torch.Tensor | None = None):
    """x [T, H] -> rms_norm(x) [T, H]; with residual [T, H]: (rms_norm(x + residual), x + residual).
    ``out`` / ``residual_out`` may be given (``residual_out`` may be ``residual`` itself: updated in place).
    With ``quantize``, rms_norm(x) comes as (e4m3 [T, H], fp32 scale per row [T]): the static ``input_scale``
    [1] of the FP8 linear it feeds, or per-row dynamic scales when that is None."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("rms_norm wants x [T, hidden] with unit stride along hidden; reshape it first")
    num_rows, hidden = x.shape
    if quantize and hidden > MAX_FUSED_WIDTH:
        raise ValueError(f"rms_norm quantizes rows of at most {MAX_FUSED_WIDTH} values (got {hidden}); quantize "
                         "its output with kernels.quantize_fp8 instead")
    row_scale = None
    if quantize:
        out, row_scale = fp8_output(num_rows, hidden, x.device)
    elif out is None:
        out = torch.empty_like(x)
    if residual is None:
        residual_out = out
    elif residual_out is None:
        residual_out = torch.empty_like(x)
    residual_in = residual if residual is not None else x
    block = triton.next_power_of_2(hidden)
    scale_arg = input_scale if input_scale is not None else weight  # unread unless static quantization
    _rms_norm_kernel[(num_rows,)](
        x, residual_in, weight, out, residual_out, row_scale if quantize else weight, scale_arg, hidden, eps,
        x.stride(0), residual_in.stride(0), out.stride(0), residual_out.stride(0),
        HAS_RESIDUAL=residual is not None, QUANTIZE=quantize, DYNAMIC=input_scale is None, BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    normed = (out, row_scale) if quantize else out
    return normed if residual is None else (normed, residual_out)
