"""INT4 rounding of one weight matrix, group-wise asymmetric (the format of layers.int4_linear):
  scale = (max - min) / 15 and zero = round(-min / scale) per group of G inputs of a row, code = round(w / scale)
  + zero clamped to 0..15; the scale is rounded to the stored dtype before the codes are computed.

Calibrated choices use the layer's input Hessian H = sum of x^T x over calibration tokens: the output error of a
weight error D [N, K] on those inputs is exactly sum((D H) * D), so no activations need to be kept.
  * ``awq_input_scales``: AWQ's activation-aware scaling (Lin et al. 2023). Inputs with large activations get their
    weight columns multiplied by s = rms(x)^alpha before rounding (and x divided by s, folded into the previous
    layer), so they round with less relative error; alpha from a grid, by output error.
  * ``clip_ratios``: AWQ's range clipping: each group's [min, max] shrunk by the ratio (from a grid) that minimizes
    that group's output error (the group's diagonal block of H).
  * ``gptq_codes``: GPTQ's error-compensated rounding (build/gptq.py's loop) with those fixed group parameters;
    ``bounded``: each code stays floor or ceil of w / scale (the error feedback only picks rounding directions, the
    search space of learned rounding such as AdaRound / AutoRound), which held up better on held-out text.
"""
from __future__ import annotations

import torch

from optimum_nvidia_core.build.gptq import gptq_round
from optimum_nvidia_core.layers.int4_linear import MAX_CODE

AWQ_ALPHAS = [i / 20 for i in range(20)]  # AWQ's grid
CLIP_RATIOS = [1.0 - 0.025 * i for i in range(12)]  # 1.0 down to 0.725
SEARCH_ROWS = 1024  # output rows the alpha search scores (rows are independent: a sample estimates the sum)
MIN_RANGE = 1e-8


def _groups(weight: torch.Tensor, group: int) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1, group)  # [N, K/G, G]


def group_params(weight: torch.Tensor, group: int, dtype: torch.dtype,
                 ratios: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (scales [N, K/G] in ``dtype``, zeros uint8 [N, K/G]); ``ratios`` [N, K/G] shrink ranges."""
    grouped = _groups(weight.float(), group)
    high, low = grouped.amax(dim=-1), grouped.amin(dim=-1)
    if ratios is not None:
        high, low = high * ratios, low * ratios
    scales = ((high - low).clamp(min=MIN_RANGE) / MAX_CODE).to(dtype)
    zeros = torch.round(-low / scales.float()).clamp(0, MAX_CODE)
    return scales, zeros.to(torch.uint8)


def round_to_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest with given group parameters: weight [N, K] -> codes uint8 [N, K]."""
    group = weight.shape[1] // scales.shape[1]
    grouped = _groups(weight.float(), group)
    codes = torch.round(grouped / scales.float().unsqueeze(-1)) + zeros.float().unsqueeze(-1)
    return codes.clamp(0, MAX_CODE).reshape(weight.shape).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> fp32 [N, K] (layers.int4_linear.dequantize without the packing)."""
    group = codes.shape[1] // scales.shape[1]
    grouped = _groups(codes.float(), group) - zeros.float().unsqueeze(-1)
    return (grouped * scales.float().unsqueeze(-1)).reshape(codes.shape)


def fake_quantize(weight: torch.Tensor, group: int, dtype: torch.dtype,
                  ratios: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest INT4 and back: fp32 [N, K]."""
    scales, zeros = group_params(weight, group, dtype, ratios)
    return dequantize_codes(round_to_codes(weight, scales, zeros), scales, zeros)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over calibration inputs x of ||x delta^T||^2 = sum((delta H) * delta)."""
    return float(((delta @ hessian) * delta).sum())


@torch.no_grad()
def awq_input_scales(weight: torch.Tensor, hessian: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The per-input scale s [K] (fp32) that minimizes the output error of rounding W diag(s), then dividing by s."""
    weight, hessian = weight.float(), hessian.float()
    rows = weight if weight.shape[0] <= SEARCH_ROWS else weight[torch.randperm(
        weight.shape[0], generator=torch.Generator().manual_seed(0))[:SEARCH_ROWS].to(weight.device)]
    rms = hessian.diagonal().clamp(min=0).sqrt()  # proportional to each input's root mean square
    rms = torch.where(rms > 0, rms, rms[rms > 0].min() if (rms > 0).any() else torch.ones_like(rms))
    best, best_error = torch.ones_like(rms), float("inf")
    for alpha in AWQ_ALPHAS:
        scales = rms.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centred: keeps W diag(s) in range
        delta = fake_quantize(rows * scales, group, dtype) / scales - rows
        error = output_error(delta, hessian)
        if error < best_error:
            best, best_error = scales, error
    return best


@torch.no_grad()
def clip_ratios(weight: torch.Tensor, hessian: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Per (row, group), the range shrink from CLIP_RATIOS with the least output error: [N, K/G] fp32."""
    weight = weight.float()
    n, k = weight.shape
    blocks = hessian.float().reshape(k // group, group, k // group, group).diagonal(dim1=0, dim2=2)  # [G, G, K/G]
    blocks = blocks.permute(2, 0, 1)  # [K/G, G, G]: each group's own block of H
    best_ratio = torch.ones(n, k // group, device=weight.device)
    best_error = torch.full((n, k // group), float("inf"), device=weight.device)
    for ratio in CLIP_RATIOS:
        ratios = torch.full_like(best_ratio, ratio)
        delta = _groups(fake_quantize(weight, group, dtype, ratios) - weight, group)  # [N, K/G, G]
        error = torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, ratios, best_ratio)
    return best_ratio


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bounded: bool = False) -> torch.Tensor:
    """GPTQ rounding (act order) to codes [N, K] with fixed group parameters (scales, zeros [N, K/G]).
    ``bounded``: each code stays one of the two neighbours of the original weight (floor or ceil of w / scale), so
    the error feedback only chooses the rounding direction."""
    group = weight.shape[1] // scales.shape[1]
    scales32, zeros32 = scales.float(), zeros.float()

    def round_column(k: int, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = scales32[:, k // group], zeros32[:, k // group]
        steps = torch.round(column / scale)
        if bounded:
            original = weight[:, k].float() / scale
            steps = steps.clamp(torch.floor(original), torch.ceil(original))
        code = (steps + zero).clamp(0, MAX_CODE)
        return code.to(torch.uint8), (code - zero) * scale

    return gptq_round(weight, hessian, round_column, torch.uint8, act_order=True)
