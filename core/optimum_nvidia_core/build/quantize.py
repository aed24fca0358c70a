"""FP8 quantization as a module swap (gpt-fast style): calibrate, then replace every decoder-layer Linear by an
Fp8Linear. Embeddings, norms and the LM head stay in the compute dtype.

Recipe defaults, and why:
- weights: e4m3 with one scale per output channel. It is more accurate than per tensor (channels of one matrix
  differ in range by orders of magnitude) and costs nothing in our GEMV/GEMM epilogue, where the scale multiplies the
  fp32 accumulator once per output. Rounded with GPTQ error compensation (build/gptq.py) from the calibration
  inputs' Hessians: plain round-to-nearest costs SmolLM2-135M ~4% perplexity by itself (``weight_rounding``).
- activations: static per-tensor scales from calibration (no run-time reduction; 2x headroom over the calibrated
  absmax, see HEADROOM; down_proj stays dynamic, see Fp8Recipe.dynamic_linears), or dynamic per token everywhere
  (``activation_scheme="dynamic"``: robust to outliers, one absmax per row at run time; with
  ``weight_rounding="nearest"`` it needs no calibration at all).
- KV cache (``kv_cache_dtype="fp8"``): one calibrated scale for K and one for V per attention layer (same headroom).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from optimum_nvidia_core.e4m3 import FP8_MAX, MIN_SCALE
from optimum_nvidia_core.layers.fp8_linear import Fp8Linear

# Static scales map HEADROOM x the calibrated absmax to 448. Text unlike the calibration set exceeds the calibrated
# range (measured on SmolLM2: up to 1.23x), and saturating outliers hurts; e4m3 is a float format, so a 2x larger
# scale only moves values one binade down and costs precision only for values already near the subnormals.
HEADROOM = 2.0
# High-precision modules that are never quantized (the LM head decides every token; it is cheap at decode).
KEEP_HIGH_PRECISION = ("lm_head",)


@dataclass(frozen=True)
class Fp8Recipe:
    use_fp8: bool = True  # FP8 linears (False: only the KV cache, if kv_cache_dtype="fp8")
    weight_scale: Literal["channel", "tensor"] = "channel"
    activation_scheme: Literal["static", "dynamic"] = "static"
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    weight_rounding: Literal["gptq", "nearest"] = "gptq"
    # Linears (by last name) that keep dynamic per-token activation scales in the static scheme. down_proj's input,
    # SiLU(gate) * up, carries a few tokens' massive activations: one static scale for it pushes every other token
    # into e4m3's subnormals (measured on SmolLM2: static everywhere 1.026x perplexity, down_proj dynamic 1.019x).
    dynamic_linears: tuple[str, ...] = ("down_proj",)

    @classmethod
    def from_config(cls, config) -> "Fp8Recipe":
        return cls(use_fp8=config.use_fp8, activation_scheme=config.activation_scheme,
                   kv_cache_dtype=config.kv_cache_dtype, weight_rounding=getattr(config, "weight_rounding", "gptq"))

    @classmethod
    def from_dict(cls, data: dict) -> "Fp8Recipe":
        fields = ("use_fp8", "weight_scale", "activation_scheme", "kv_cache_dtype", "weight_rounding")
        recipe = cls(**{k: data[k] for k in fields if k in data})
        if "dynamic_linears" in data:
            recipe = cls(**{**asdict(recipe), "dynamic_linears": tuple(data["dynamic_linears"])})
        return recipe

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def static_activations(self) -> bool:
        return self.use_fp8 and self.activation_scheme == "static"

    def static_input(self, linear_name: str) -> bool:
        """Whether this linear gets a calibrated static activation scale (else dynamic per token)."""
        return self.static_activations and linear_name.split(".")[-1] not in self.dynamic_linears

    @property
    def uses_gptq(self) -> bool:
        return self.use_fp8 and self.weight_rounding == "gptq"

    @property
    def needs_calibration(self) -> bool:
        return self.static_activations or self.uses_gptq or self.kv_cache_dtype == "fp8"


def check_fp8_supported(device: torch.device) -> None:
    """FP8 tensor cores need compute capability 8.9+ (Ada, Hopper, Blackwell). The CPU emulates e4m3 exactly."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise RuntimeError(
            f"FP8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Use use_fp8=False and kv_cache_dtype='auto' "
            "(bf16) on this GPU.")


def quantizable_linear_names(model: nn.Module) -> list[str]:
    """Names of the layers.linear.Linear modules that FP8 replaces (every one but the LM head)."""
    from optimum_nvidia_core.layers.linear import Linear

    return [name for name, module in model.named_modules()
            if isinstance(module, Linear) and name.split(".")[-1] not in KEEP_HIGH_PRECISION]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, recipe: Fp8Recipe, calib_token_lists: list[list[int]] | None = None,
                   progress: bool = True) -> nn.Module:
    """Calibrate on ``calib_token_lists`` (token ids per sample) when the recipe needs it, then swap in Fp8Linear
    and set the KV scales. Works in place; returns the model."""
    from optimum_nvidia_core.build.calibration import collect_stats

    names = quantizable_linear_names(model) if recipe.use_fp8 else []
    stats = None
    if recipe.needs_calibration:
        if not calib_token_lists:
            raise ValueError("this FP8 recipe needs calibration data (GPTQ rounding, static activation or KV scales); "
                             "pass token lists, or use weight_rounding='nearest', activation_scheme='dynamic' and "
                             "kv_cache_dtype='auto'")
        stats = collect_stats(model, [n for n in names if recipe.static_input(n)], calib_token_lists, progress,
                              hessian_names=names if recipe.uses_gptq else [])
    _swap_linears(model, names, recipe, stats, progress)
    if recipe.kv_cache_dtype == "fp8":
        set_kv_scales(model, [a * HEADROOM / FP8_MAX for a in stats.k_absmax],
                      [a * HEADROOM / FP8_MAX for a in stats.v_absmax])
    return model


def _swap_linears(model: nn.Module, names: list[str], recipe: Fp8Recipe, stats, progress: bool) -> None:
    from tqdm.auto import tqdm

    from optimum_nvidia_core.build.gptq import gptq_quantize_weight

    per_channel = recipe.weight_scale == "channel"
    for name in tqdm(names, desc="FP8 weights", unit="linear", disable=not progress):
        linear = model.get_submodule(name)
        absmax = stats.input_absmax[name] * HEADROOM if recipe.static_input(name) else None
        quantized = None
        if recipe.uses_gptq:  # pop: each Hessian is freed once used
            quantized = gptq_quantize_weight(linear.weight.detach(), stats.hessians.pop(name), per_channel)
        _set_submodule(model, name, Fp8Linear.from_linear(linear, absmax, per_channel, quantized))


def set_kv_scales(model: nn.Module, k_scales: list[float], v_scales: list[float]) -> None:
    """Per attention layer: the cache stores k / k_scale and v / v_scale in e4m3."""
    for layer, k_scale, v_scale in zip(model.attention_layers(), k_scales, v_scales, strict=True):
        device = layer.k_scale.device if isinstance(getattr(layer, "k_scale", None), torch.Tensor) else None
        layer.k_scale = torch.tensor([max(k_scale, MIN_SCALE)], dtype=torch.float32, device=device)  # fp32 [1]
        layer.v_scale = torch.tensor([max(v_scale, MIN_SCALE)], dtype=torch.float32, device=device)


def kv_scales(model: nn.Module) -> tuple[list[float], list[float]]:
    layers = model.attention_layers()
    return [float(layer.k_scale) for layer in layers], [float(layer.v_scale) for layer in layers]


def swap_in_empty_fp8(model: nn.Module, recipe: Fp8Recipe, dtype: torch.dtype, device: torch.device) -> None:
    """Replace the quantizable linears by empty Fp8Linear modules of the same shapes (to load saved weights)."""
    if not recipe.use_fp8:
        return
    for name in quantizable_linear_names(model):
        linear = model.get_submodule(name)
        out_features, in_features = linear.weight.shape
        _set_submodule(model, name, Fp8Linear(
            in_features, out_features, bias=getattr(linear, "bias", None) is not None,
            per_channel=recipe.weight_scale == "channel", static_input_scale=recipe.static_input(name),
            bias_dtype=dtype, device=device,
        ))
