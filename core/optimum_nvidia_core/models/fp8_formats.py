"""Pre-quantized FP8 checkpoints of the LLaMA family, served as they are (no build, no calibration).

Two on-disk formats, detected from config.json's ``quantization_config`` (or ModelOpt's hf_quant_config.json):

compressed-tensors (llm-compressor; the RedHatAI / neuralmagic "...-FP8" releases)
    quant_method "compressed-tensors", format "float-quantized"; a config group targeting "Linear" with
    weights {type float, num_bits 8, symmetric, static, strategy "tensor" | "channel"} and input_activations
    {strategy "tensor", static} or {strategy "token", dynamic}; "ignore" lists modules kept in high precision.
    Per linear: weight F8_E4M3 [out, in]; weight_scale in the checkpoint dtype, [1] (tensor) or [out, 1] (channel);
    input_scale [1] (static only). kv_cache_scheme {float, 8 bits, "tensor"}: self_attn.k_scale / v_scale [1]
    (older files: k_proj.output_scale / v_proj.output_scale).
ModelOpt (NVIDIA; the nvidia/"...-FP8" releases)
    hf_quant_config.json {"quantization": {"quant_algo", "kv_cache_quant_algo", "exclude_modules"}}, or config.json
    {"quant_method": "modelopt", "quant_algo", "kv_cache_scheme", "ignore"}. quant_algo "FP8": weight F8_E4M3,
    weight_scale and input_scale fp32 scalars; "FP8_PER_CHANNEL_PER_TOKEN": weight_scale [out], dynamic activations.
    KV scales (kv_cache_quant_algo "FP8"): self_attn.k_proj.k_scale / self_attn.v_proj.v_scale.
In every format the real value is e4m3 * scale, and the KV cache stores k / k_scale: our conventions.

Onto our fused projections: the per-tensor weight scales of q, k, v (gate, up) become per-channel scales of the
fused rows (exact, nothing is re-rounded); their static input scales, calibrated on the same input, become their
max (no part saturates). Block, group, asymmetric, weight-only and e5m2 schemes raise UnsupportedFp8Checkpoint,
naming the field; other quantization methods (AWQ, GPTQ) are left to their own loader.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

MODELOPT_CONFIG = "hf_quant_config.json"
FP8_DTYPE_NAME = "float8_e4m3fn"


class UnsupportedFp8Checkpoint(ValueError):
    """The checkpoint declares an FP8 scheme this engine cannot serve (the message names it)."""


@dataclass(frozen=True)
class Fp8CheckpointFormat:
    producer: str  # "compressed-tensors" | "modelopt"
    weight_scale: str  # "tensor" | "channel"
    static_activations: bool  # a calibrated input_scale per linear (else dynamic per token)
    kv_cache: bool  # the checkpoint has FP8 KV-cache scales
    ignore: tuple[str, ...] = ()  # modules kept in high precision (compressed-tensors names / "re:" regexes, ModelOpt
    # wildcards)

    def is_quantized(self, hf_module: str) -> bool:
        """Whether a decoder linear (Hugging Face name, e.g. model.layers.0.self_attn.q_proj) is stored in FP8."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], hf_module):
                    return False
            elif hf_module == pattern or hf_module.endswith("." + pattern) or fnmatch.fnmatchcase(hf_module, pattern):
                return False
        return True


def checkpoint_format(model_dir: Path) -> Fp8CheckpointFormat | None:
    """The FP8 format ``model_dir`` declares; None when it declares no compressed-tensors / ModelOpt quantization
    (or a non-float one, such as INT4 or INT8, which other loaders own)."""
    from ..hub import read_config_dict

    config = read_config_dict(Path(model_dir)).get("quantization_config")
    legacy = Path(model_dir) / MODELOPT_CONFIG
    if config is None and legacy.is_file():
        config = json.loads(legacy.read_text())
        if "quantization" in config:
            return _modelopt(config["quantization"], legacy=True)
    if not isinstance(config, dict):
        return None
    method = str(config.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(config)
    if method.startswith("modelopt"):
        return _modelopt(config.get("quantization", config), legacy="quantization" in config)
    return None


def _unsupported(producer: str, what: str) -> UnsupportedFp8Checkpoint:
    return UnsupportedFp8Checkpoint(
        f"This {producer} checkpoint uses {what}, which this engine does not serve. Supported: FP8 e4m3 weights with "
        "per-tensor or per-channel scales and static per-tensor or dynamic per-token activations (llm-compressor "
        "FP8 / FP8_DYNAMIC, ModelOpt FP8 / FP8_PER_CHANNEL_PER_TOKEN); or build FP8 from the bf16 checkpoint with "
        "use_fp8=True.")


def _compressed_tensors(config: dict) -> Fp8CheckpointFormat | None:
    producer = "compressed-tensors"
    groups = list((config.get("config_groups") or {}).values())
    if not groups:
        raise _unsupported(producer, "no config_groups")
    weights = [g.get("weights") or {} for g in groups]
    if all(w.get("type") == "int" for w in weights):
        return None  # integer schemes (W4A16, W8A8-INT8) are not FP8: another loader's, or unsupported there
    schemes = {json.dumps([g.get("weights"), g.get("input_activations")], sort_keys=True) for g in groups}
    if len(schemes) > 1:
        raise _unsupported(producer, f"{len(groups)} config groups with different schemes (mixed precision)")
    group, weight = groups[0], weights[0]
    activation = group.get("input_activations")
    fmt = str(config.get("format") or group.get("format") or "")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _unsupported(producer, f"format={fmt!r} (only 'float-quantized')")
    _check_float8(producer, "weights", weight)
    if weight.get("dynamic") or weight.get("strategy") not in ("tensor", "channel"):
        raise _unsupported(producer, f"weights strategy={weight.get('strategy')!r}, dynamic={weight.get('dynamic')} "
                                     "(block- and group-wise FP8 weights are not supported)")
    if not activation:
        raise _unsupported(producer, "FP8 weights with high-precision activations (W8A16: no input_activations)")
    _check_float8(producer, "input_activations", activation)
    static = not activation.get("dynamic")
    expected = "tensor" if static else "token"
    if activation.get("strategy") != expected:
        raise _unsupported(producer, f"input_activations strategy={activation.get('strategy')!r}, dynamic="
                                     f"{activation.get('dynamic')} (static 'tensor' or dynamic 'token' only)")
    kv = config.get("kv_cache_scheme")
    if kv:
        _check_float8(producer, "kv_cache_scheme", kv)
        if kv.get("strategy", "tensor") != "tensor" or kv.get("dynamic"):
            raise _unsupported(producer, f"kv_cache_scheme strategy={kv.get('strategy')!r} (one static scale per "
                                         "layer for K and for V only)")
    return Fp8CheckpointFormat(producer, weight["strategy"], static, bool(kv), tuple(config.get("ignore") or ()))


def _check_float8(producer: str, field: str, args: dict) -> None:
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise _unsupported(producer, f"{field} type={args.get('type')!r}, num_bits={args.get('num_bits')}")
    if args.get("symmetric") is False:
        raise _unsupported(producer, f"asymmetric {field} (symmetric=False)")
    if args.get("group_size") or args.get("block_structure"):
        raise _unsupported(producer, f"{field} strategy={args.get('strategy')!r}, group_size="
                                     f"{args.get('group_size')}, block_structure={args.get('block_structure')}")


def _modelopt(config: dict, legacy: bool) -> Fp8CheckpointFormat | None:
    producer = "ModelOpt"
    algo = str(config.get("quant_algo") or "").upper()
    if algo.startswith(("INT", "W4A16_AWQ", "W8A16")):
        return None  # integer schemes: not FP8
    if algo not in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        raise _unsupported(producer, f"quant_algo={algo or None!r}")
    if legacy:
        kv_algo, ignore = config.get("kv_cache_quant_algo"), config.get("exclude_modules")
    else:
        kv = config.get("kv_cache_scheme")
        kv_algo = "FP8" if isinstance(kv, dict) and kv.get("type") == "float" and kv.get("num_bits") == 8 else kv
        ignore = config.get("ignore")
    if kv_algo not in (None, "FP8"):
        raise _unsupported(producer, f"kv_cache_quant_algo={kv_algo!r} (only 'FP8')")
    per_tensor = algo == "FP8"
    return Fp8CheckpointFormat(producer, "tensor" if per_tensor else "channel", per_tensor, kv_algo == "FP8",
                               tuple(ignore or ()))
