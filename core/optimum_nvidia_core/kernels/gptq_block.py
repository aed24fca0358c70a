"""One block of GPTQ's column loop (build/gptq.py) in one launch.

The loop is sequential along the input columns but independent across output channels, so each program owns
BLOCK_N output channels and keeps the block's rows [B, BLOCK_N] in registers while it rounds them one after the
other: on the GPU that is one launch per 64 columns instead of ~10 small kernels per column (the torch loop was
launch-bound: ~100 s for a 7B model on an H100).

Same numerics as the torch loop (build/gptq.py::_round_block): IEEE division (div_rn), saturation to +-448,
round-to-nearest-even to e4m3, and the error update as a separate multiply and subtract (launched with
enable_fp_fusion=False, so no fused multiply-add changes the rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimum_nvidia_core import e4m3

FP8_MAX = tl.constexpr(e4m3.FP8_MAX)


@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, scale_ptr, codes_ptr, err_ptr, rows, N, stride_w, stride_u, stride_c,
                       stride_e, B: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    r = tl.arange(0, B)
    row_mask = r < rows
    tile = tl.load(w_ptr + r[:, None] * stride_w + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                   other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=1.0)
    for i in range(rows):
        row = tl.sum(tl.where(r[:, None] == i, tile, 0.0), axis=0)  # exact: one value plus zeros
        code = tl.clamp(tl.math.div_rn(row, scale), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        error = tl.math.div_rn(row - code.to(tl.float32) * scale, tl.load(u_ptr + i * stride_u + i))
        tl.store(codes_ptr + i * stride_c + cols, code, mask=col_mask)
        tl.store(err_ptr + i * stride_e + cols, error, mask=col_mask)
        u_row = tl.load(u_ptr + i * stride_u + r, mask=row_mask & (r > i), other=0.0)  # U[i, j] for j > i
        tile = tile - u_row[:, None] * error[None, :]


def gptq_round_block(block: torch.Tensor, factor: torch.Tensor, scale_row: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """block fp32 [b, N] (rows = input columns in rounding order), factor fp32 [b, b] (the block's slice of the
    upper Cholesky factor of H^-1), scale_row fp32 [N] -> (e4m3 codes [b, N], fp32 scaled errors [b, N])."""
    rows, n = block.shape
    if rows > 128:
        raise ValueError(f"a GPTQ block has at most 128 rows, got {rows}")
    block, factor, scale_row = block.contiguous(), factor.contiguous(), scale_row.contiguous()
    codes = torch.empty(rows, n, dtype=torch.float8_e4m3fn, device=block.device)
    errors = torch.empty(rows, n, dtype=torch.float32, device=block.device)
    b = max(16, triton.next_power_of_2(rows))
    block_n = 64 if b <= 64 else 32  # the tile stays in registers: b * block_n fp32 values per program
    _gptq_block_kernel[(triton.cdiv(n, block_n),)](
        block, factor, scale_row, codes, errors, rows, n, block.stride(0), factor.stride(0), codes.stride(0),
        errors.stride(0), B=b, BLOCK_N=block_n, num_warps=4, enable_fp_fusion=False,
    )
    return codes, errors
