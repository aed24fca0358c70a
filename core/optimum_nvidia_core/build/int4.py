"""INT4 weight-only quantization at build time, as a module swap: every decoder-layer Linear becomes an Int4Linear
(group-wise 128, asymmetric); embeddings, norms and the LM head stay in the compute dtype. Cached like FP8
engines: the recipe below is part of the engine's identity (build/engine_dir.py).

Methods (``int4_method``; build/int4_rounding.py has the math):
  * "awq_bounded" (default): "awq"'s scales and clipping, then GPTQ's error-compensated rounding restricted to
    each weight's two neighbouring codes (floor or ceil of w / scale): the error feedback only picks rounding
    directions. Measured best on SmolLM2 (benchmarks/NOTES.md, "INT4 quality, round 2").
  * "awq": activation-aware input scales folded into the previous norm / projection, range clipping,
    round-to-nearest.
  * "awq_gptq": the same scales and clipping, then free GPTQ rounding of the scaled weights (the Hessians follow
    the scales). Worse than "awq" with the built-in calibration set (4k tokens), better with 40k.
  * "gptq": range clipping, then GPTQ rounding, no scales.
  * "rtn": plain round-to-nearest, no calibration.
Calibration collects one input Hessian per linear (build/calibration.py, as FP8's GPTQ does); the scale and clip
searches score candidates by exact output error on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from optimum_nvidia_core.build import int4_rounding
from optimum_nvidia_core.build.quantize import HEADROOM, quantizable_linear_names, set_kv_scales
from optimum_nvidia_core.layers.fp8_linear import FP8_MAX
from optimum_nvidia_core.layers.int4_linear import Int4Linear

GROUP_SIZE = 128


@dataclass(frozen=True)
class Int4Recipe:
    # "loaded": an AWQ / GPTQ checkpoint's weights
    method: Literal["awq_bounded", "awq", "awq_gptq", "gptq", "rtn", "loaded"] = "awq_bounded"
    group_size: int = GROUP_SIZE
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"

    @classmethod
    def from_config(cls, config) -> "Int4Recipe":
        return cls(method=config.int4_method, kv_cache_dtype=config.kv_cache_dtype)

    @classmethod
    def from_dict(cls, data: dict) -> "Int4Recipe | None":
        """The recipe recorded in an engine manifest, or None for an engine without INT4 weights."""
        if data.get("quantization") != "int4":
            return None
        return cls(data["int4_method"], data["group_size"], data.get("kv_cache_dtype", "auto"))

    def to_dict(self) -> dict:
        # use_fp8 / kv_cache_dtype as Fp8Recipe names them: load_engine reads the KV part through Fp8Recipe.
        return {"quantization": "int4", "int4_method": self.method, "group_size": self.group_size,
                "use_fp8": False, "kv_cache_dtype": self.kv_cache_dtype}

    @property
    def uses_awq_scales(self) -> bool:
        return self.method in ("awq", "awq_bounded", "awq_gptq")

    @property
    def uses_gptq(self) -> bool:
        return self.method in ("gptq", "awq_gptq", "awq_bounded")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.kv_cache_dtype == "fp8"


def group_size_of(linear: nn.Module, group_size: int) -> int:
    """The recipe's group size where it divides in_features; else the largest of its halves down to 32 that does
    (SmolLM2's 576-wide inputs get groups of 64); else one group per row."""
    in_features = linear.weight.shape[1]
    size = group_size
    while size >= 32:
        if in_features % size == 0:
            return size
        size //= 2
    return in_features


@torch.no_grad()
def quantize_model_int4(model: nn.Module, recipe: Int4Recipe, calib_token_lists: list[list[int]] | None = None,
                        progress: bool = True, hessians: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Calibrate (unless "rtn" without an FP8 KV cache), scale (AWQ), then swap every decoder Linear for an
    Int4Linear in place. Returns the model. ``hessians``: input Hessians already collected on this model (by
    calibration.collect_stats; consumed), instead of a calibration pass (no FP8 KV cache then)."""
    from tqdm.auto import tqdm

    from optimum_nvidia_core.build.calibration import collect_stats

    names = quantizable_linear_names(model)
    stats = None
    if hessians is not None:
        if recipe.kv_cache_dtype == "fp8":
            raise ValueError("kv_cache_dtype='fp8' needs a calibration pass for K/V scales; pass token lists")
    elif recipe.needs_calibration:
        if not calib_token_lists:
            raise ValueError(f"INT4 method {recipe.method!r} needs calibration data; pass token lists, or use "
                             "int4_method='rtn'")
        stats = collect_stats(model, [], calib_token_lists, progress,
                              hessian_names=names if recipe.method != "rtn" else [])
        hessians = stats.hessians
    hessians = hessians if recipe.method != "rtn" else {}
    if recipe.uses_awq_scales:
        apply_awq_scales(model, hessians, recipe.group_size)
    for name in tqdm(names, desc="INT4 weights", unit="linear", disable=not progress):
        linear = model.get_submodule(name)
        model.set_submodule(name, quantize_linear(linear, hessians.pop(name, None), recipe))
    if recipe.kv_cache_dtype == "fp8":
        set_kv_scales(model, [a * HEADROOM / FP8_MAX for a in stats.k_absmax],
                      [a * HEADROOM / FP8_MAX for a in stats.v_absmax])
    return model


def quantize_linear(linear: nn.Module, hessian: torch.Tensor | None, recipe: Int4Recipe) -> Int4Linear:
    weight = linear.weight.float()
    group = group_size_of(linear, recipe.group_size)
    ratios = None
    if hessian is not None:
        hessian = hessian.to(weight.device)
        ratios = int4_rounding.clip_ratios(weight, hessian, group, linear.weight.dtype)
    scales, zeros = int4_rounding.group_params(weight, group, linear.weight.dtype, ratios)
    if recipe.uses_gptq:
        codes = int4_rounding.gptq_codes(weight, hessian, scales, zeros, bounded=recipe.method == "awq_bounded")
    else:
        codes = int4_rounding.round_to_codes(weight, scales, zeros)
    return Int4Linear.from_codes(linear, codes, scales, zeros)


def apply_awq_scales(model: nn.Module, hessians: dict[str, torch.Tensor], group_size: int) -> None:
    """Per decoder layer and linear: search s, then W <- W diag(s) and the producer of its input <- producer / s
    (exact in real arithmetic: the high-precision model computes the same function). Hessians follow the inputs:
    H <- diag(1/s) H diag(1/s)."""
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}"
        attn, mlp = layer.self_attn, layer.mlp
        targets = [  # (linear name, linear, how to divide its input by s)
            (f"{prefix}.self_attn.qkv_proj", attn.qkv_proj, _scale_vector(layer.input_layernorm.weight)),
            (f"{prefix}.mlp.gate_up_proj", mlp.gate_up_proj, _scale_vector(layer.post_attention_layernorm.weight)),
            (f"{prefix}.mlp.down_proj", mlp.down_proj, _scale_rows(mlp.gate_up_proj, 1)),  # up = silu(g) * u
        ]
        if attn.num_kv_heads == attn.num_heads:  # o_proj's input is v, channel for channel (no GQA sharing)
            targets.append((f"{prefix}.self_attn.o_proj", attn.o_proj, _scale_rows(attn.qkv_proj, 2)))
        for name, linear, divide_input in targets:
            hessian = hessians[name]
            group = group_size_of(linear, group_size)
            scales = int4_rounding.awq_input_scales(linear.weight, hessian.to(linear.weight.device), group,
                                                    linear.weight.dtype)
            divide_input(scales)
            linear.weight.mul_(scales.to(linear.weight.dtype))
            inverse = (1.0 / scales).to(hessian.device)
            hessians[name] = hessian * inverse[:, None] * inverse[None, :]


def _scale_vector(weight: torch.Tensor):
    def divide(scales: torch.Tensor) -> None:
        weight.div_(scales.to(weight.dtype))
    return divide


def _scale_rows(linear: nn.Module, part: int):
    """Divides the output rows of one part of a fused linear (and its bias) by s."""
    def divide(scales: torch.Tensor) -> None:
        rows = linear.shard_rows(part)
        linear.weight[rows].div_(scales.to(linear.weight.dtype)[:, None])
        if linear.bias is not None:
            linear.bias[rows].div_(scales.to(linear.bias.dtype))
    return divide


def swap_in_empty_int4(model: nn.Module, recipe: Int4Recipe, dtype: torch.dtype, device) -> None:
    """Replace the quantizable linears by empty Int4Linear modules of the same shapes (to load saved weights)."""
    for name in quantizable_linear_names(model):
        linear = model.get_submodule(name)
        model.set_submodule(name, Int4Linear.like(linear, group_size_of(linear, recipe.group_size), dtype, device))


def int4_recipe_of(model: nn.Module) -> Int4Recipe | None:
    """The INT4 recipe that ``swap_in_empty_int4`` needs to rebuild this model's modules (None: no INT4)."""
    linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not linears:
        return None
    return Int4Recipe("loaded", max(m.group_size for m in linears))


__all__ = ["Int4Recipe", "int4_recipe_of", "quantize_model_int4", "swap_in_empty_int4"]
