"""RMSNorm, optionally fused with the residual add before it: one read and one write per row instead of five.

Numerics follow transformers' LlamaRMSNorm: the residual sum is rounded to the compute dtype (it is the new
residual stream), the statistics are fp32, the normalized row is rounded to the compute dtype, then multiplied by
the weight and rounded again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, hidden, eps,
                     stride_x, stride_r, stride_o, stride_ro, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
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
    tl.store(out_ptr + row * stride_o + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """x [T, H] -> rms_norm(x) [T, H]; with residual [T, H]: (rms_norm(x + residual), x + residual).
    ``out`` / ``residual_out`` may be given (``residual_out`` may be ``residual`` itself: updated in place)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("rms_norm wants x [T, hidden] with unit stride along hidden; reshape it first")
    num_rows, hidden = x.shape
    out = torch.empty_like(x) if out is None else out
    if residual is None:
        residual_out = out
    elif residual_out is None:
        residual_out = torch.empty_like(x)
    residual_in = residual if residual is not None else x
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x, residual_in, weight, out, residual_out, hidden, eps,
        x.stride(0), residual_in.stride(0), out.stride(0), residual_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
    )
    return out if residual is None else (out, residual_out)
