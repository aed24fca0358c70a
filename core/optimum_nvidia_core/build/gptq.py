"""Error-compensated rounding of weights to e4m3 (GPTQ, Frantar et al. 2022), with the same scales as plain
rounding, so the stored format and the kernels are unchanged.

Why: rounding each weight to the nearest e4m3 value (3 mantissa bits) leaves ~2.6% relative error per matrix. On
SmolLM2-135M that alone costs ~4% perplexity. GPTQ rounds one input column at a time and pushes each column's
rounding error onto the columns not yet rounded, weighted by the inverse Hessian H = X^T X of the layer's
calibration inputs, so the error the layer's *output* sees shrinks (measured: 1.042x -> 1.019x, weights only).

``gptq_round`` is the loop without the format (build/int4.py rounds INT4 groups with it).

Cost: one [K, K] Hessian per linear (accumulated during calibration), its inverse's Cholesky factor, and the
column loop: blocked ("lazy batch updates"); for FP8 on the GPU one Triton launch per 64 columns
(kernels/gptq_block.py), elsewhere the per-column torch loop with the same numerics.
"""
from __future__ import annotations

from typing import Callable

import torch

from optimum_nvidia_core.layers.fp8_linear import absmax_scale, quantize_fp8

BLOCK = 64  # columns rounded together before their error reaches the rest through one matmul
DAMPINGS = (0.01, 0.1, 1.0)  # fractions of the mean Hessian diagonal added to it, tried in turn until Cholesky works

RoundColumn = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (rows [b, N] of one block, not modified; factor [b, b]; index of its first row) -> (codes [b, N], errors [b, N])
RoundBlock = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor, hessian: torch.Tensor, per_channel: bool = True, act_order: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] (sum of x^T x over calibration inputs x [T, K]) ->
    (e4m3 weight [N, K], fp32 scale [N] or [1]): the same scales as layers.fp8_linear.quantize_weight.

    ``act_order``: round the input columns with the most energy first, while the most columns are left to absorb
    their error (the GPTQ paper's "act order")."""
    scale = absmax_scale(weight, dim=1) if per_channel else absmax_scale(weight).reshape(1, 1)  # [N, 1] or [1, 1]
    scale_row = scale.reshape(-1).expand(weight.shape[0]).contiguous().float()  # [N]
    kernel = _block_kernel(weight.device)
    if kernel is not None:
        def round_block(block, factor, _first):
            return kernel(block, factor, scale_row)
    else:
        def round_block(block, factor, _first):
            return fp8_round_block(block, factor, scale_row)
    codes = _gptq(weight, hessian, round_block, torch.float8_e4m3fn, act_order, columns=None)
    return codes, scale.reshape(-1)


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, round_column: RoundColumn, code_dtype: torch.dtype,
               act_order: bool = True) -> torch.Tensor:
    """The GPTQ loop for any format: weight [N, K], hessian [K, K] -> codes [N, K] of ``code_dtype``.
    ``round_column(k, column [N] fp32)`` rounds input column k (its index in ``weight``) to (codes [N], their
    dequantized values [N] fp32)."""
    columns: list[int] = []

    def round_block(block, factor, first):
        return _round_block_rows(block, factor, first, lambda i, row: round_column(columns[i], row), code_dtype)

    return _gptq(weight, hessian, round_block, code_dtype, act_order, columns)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, round_block: RoundBlock, code_dtype: torch.dtype,
          act_order: bool, columns: list[int] | None) -> torch.Tensor:
    """Order the input columns, factor the inverse Hessian, run the blocked loop; codes [N, K]. ``columns`` (when
    given) is filled with the rounding order, for round functions that need each column's original index."""
    hessian = hessian.float().to(weight.device)
    k = weight.shape[1]
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(k, device=weight.device)
    if columns is not None:
        columns.extend(order.tolist())
    hessian = hessian[order][:, order]
    # Work on W^T [K, N] (columns in rounding order) so that "column i of W" is a contiguous row.
    w_t = weight.float().t()[order].contiguous()
    upper = _inverse_hessian_factor(hessian, w_t)
    codes_t = torch.empty_like(w_t, dtype=code_dtype)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        codes_t[start:end], errors = round_block(w_t[start:end], upper[start:end, start:end], start)
        w_t[end:] -= upper[start:end, end:].t() @ errors  # the block's error, onto the columns after it
    codes = torch.empty_like(codes_t)
    codes[order] = codes_t
    return codes.t().contiguous()


def fp8_round_block(block: torch.Tensor, factor: torch.Tensor, scale_row: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of kernels/gptq_block.py: block [b, N] (not modified), factor [b, b], scale_row [N] ->
    (e4m3 codes [b, N], scaled errors [b, N])."""
    def round_row(_i: int, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = quantize_fp8(row, scale_row)
        return code, code.float() * scale_row

    return _round_block_rows(block, factor, 0, round_row, torch.float8_e4m3fn)


def _round_block_rows(block: torch.Tensor, factor: torch.Tensor, first: int, round_row: RoundColumn,
                      code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One block, row by row: each row's scaled error goes onto the block's later rows."""
    block = block.clone()
    codes = torch.empty_like(block, dtype=code_dtype)
    errors = torch.empty_like(block)
    for i in range(block.shape[0]):
        row = block[i]
        codes[i], dequantized = round_row(first + i, row)
        error = (row - dequantized) / factor[i, i]
        block[i + 1:] -= factor[i, i + 1:].unsqueeze(1) * error.unsqueeze(0)
        errors[i] = error
    return codes, errors


def _block_kernel(device: torch.device):
    """The Triton FP8 block kernel on a CUDA device (None elsewhere, or where Triton cannot load)."""
    if device.type != "cuda":
        return None
    try:
        from optimum_nvidia_core.kernels.gptq_block import gptq_round_block
    except ImportError:
        return None
    return gptq_round_block


def _inverse_hessian_factor(hessian: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (after damping). Inputs that never fired get weight 0 and H_ii = 1.

    A Hessian that stays indefinite in float32 (seen on a random 7B checkpoint on the GPU) gets more damping; if
    even that fails, the identity factor makes the loop plain round-to-nearest for this layer, never a crash."""
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    w_t[dead] = 0.0
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diagonal = hessian.diagonal().mean()
    for damping in DAMPINGS:
        lower, info = torch.linalg.cholesky_ex(hessian + damping * mean_diagonal * identity)
        if int(info) != 0:
            continue
        inverse = torch.cholesky_solve(identity, lower)  # cholesky_inverse: 15x slower on CPU
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        if int(info) == 0:
            return upper
    return identity
