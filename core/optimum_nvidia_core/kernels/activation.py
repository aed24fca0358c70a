"""SiLU(gate) * up over the fused gate_up projection, in one pass.

Numerics follow transformers' LlamaMLP in bf16: silu is computed in fp32 and rounded, then the product is rounded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, 2 * I] = [gate | up] -> silu(gate) * up [T, I]."""
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] % 2:
        raise ValueError("silu_and_mul wants x [T, 2 * intermediate] (gate then up) with unit stride along it")
    num_rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device) if out is None else out
    block = 1024
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](x, out, inter, x.stride(0), out.stride(0),
                                                                 BLOCK=block, num_warps=4)
    return out
