"""Random-weight FP8 checkpoints written exactly as llm-compressor (compressed-tensors) and NVIDIA ModelOpt write
theirs: config.json's quantization_config (and ModelOpt's hf_quant_config.json), tensor names, shapes and dtypes.

For tests (tiny configs) and benchmarks of real shapes (a 70B FP8 checkpoint written straight in FP8: its bf16
original would not fit the disk). Layouts as in the public releases (see models/fp8_formats.py):
    compressed-tensors  weight F8_E4M3 [out, in]; weight_scale, input_scale in the checkpoint dtype, [1] or [out, 1];
                        self_attn.k_scale / v_scale [1]
    ModelOpt            weight F8_E4M3; weight_scale fp32 [] (or [out] per channel); input_scale fp32 [];
                        self_attn.k_proj.k_scale / v_proj.v_scale fp32 []
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch

from optimum_nvidia_core.layers.fp8_linear import FP8_DTYPE, FP8_MAX
from optimum_nvidia_core.models.fp8_formats import MODELOPT_CONFIG

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def compressed_tensors_config(weight_scale: str, static_activations: bool, kv_cache: bool) -> dict:
    """config.json's quantization_config as llm-compressor writes it for FP8 (static) / FP8_DYNAMIC."""
    def args(strategy: str, dynamic: bool) -> dict:
        return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": None, "num_bits": 8,
                "observer": None if dynamic else "minmax", "observer_kwargs": {}, "strategy": strategy,
                "symmetric": True, "type": "float"}

    return {
        "config_groups": {"group_0": {
            "input_activations": args("tensor", False) if static_activations else args("token", True),
            "output_activations": None, "targets": ["Linear"], "weights": args(weight_scale, False)}},
        "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
        "kv_cache_scheme": args("tensor", False) if kv_cache else None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed",
    }


def modelopt_configs(weight_scale: str, kv_cache: bool) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json's quantization_config) as ModelOpt's unified HF export writes them."""
    algo = "FP8" if weight_scale == "tensor" else "FP8_PER_CHANNEL_PER_TOKEN"
    legacy = {"producer": {"name": "modelopt", "version": "0.19.0"},
              "quantization": {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv_cache else None,
                               "exclude_modules": ["lm_head"]}}
    float8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    converted = {"config_groups": {"group_0": {"input_activations": float8, "weights": float8, "targets": ["Linear"]}},
                 "ignore": ["lm_head"], "quant_algo": algo, "producer": legacy["producer"],
                 "quant_method": "modelopt", **({"kv_cache_scheme": float8} if kv_cache else {})}
    return legacy, converted


def write_fp8_checkpoint(config, out_dir: Path, producer: str = "compressed-tensors", weight_scale: str = "tensor",
                         static_activations: bool = True, kv_cache: bool = True, dtype: torch.dtype = torch.bfloat16,
                         std: float = 0.02, seed: int = 0, device: str = "cpu", max_shard_bytes: int = 5 << 30,
                         modelopt_in_config: bool = True, place: Callable[[str, int], Path] | None = None) -> Path:
    """Write config.json (+ hf_quant_config.json for ModelOpt) and sharded safetensors of random FP8 weights.

    Each shard is written as soon as it is made, so the host holds one shard at most (a 70B checkpoint is ~73 GB).
    ``place(file_name, nbytes)``: the directory that shard goes to (default ``out_dir``); a shard placed elsewhere is
    linked into ``out_dir`` (the index names plain file names, as in any checkpoint)."""
    if producer == "modelopt" and (weight_scale == "tensor") != static_activations:
        raise ValueError("ModelOpt writes FP8 (per-tensor, static) or FP8_PER_CHANNEL_PER_TOKEN (channel, dynamic)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    scale_dtype = dtype if producer == "compressed-tensors" else torch.float32
    shards = plan_shards(config, dtype, max_shard_bytes)
    weight_map = {}
    for i, (names, nbytes) in enumerate(shards):
        tensors = {}
        for name, shape in names:
            module, _, leaf = name.rpartition(".")
            made = {name: _random(shape, std, name.endswith("norm.weight"), generator, device).to(dtype)}
            if _is_fp8_weight(name):
                made = _quantized(module, made[name].float(), producer, weight_scale, static_activations, scale_dtype,
                                  generator)
            if kv_cache and module.endswith("self_attn.k_proj") and leaf == "weight":
                made.update(_kv_scales(module.rsplit(".", 1)[0], producer, scale_dtype, generator, device))
            tensors.update({n: t.cpu() for n, t in made.items()})
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(tensors, out_dir, file, place(file, nbytes) if place else out_dir)
        weight_map.update(dict.fromkeys(tensors, file))
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if producer == "compressed-tensors":
        config.quantization_config = compressed_tensors_config(weight_scale, static_activations, kv_cache)
    else:
        legacy, converted = modelopt_configs(weight_scale, kv_cache)
        (out_dir / MODELOPT_CONFIG).write_text(json.dumps(legacy, indent=2))
        if modelopt_in_config:
            config.quantization_config = converted
    config.save_pretrained(str(out_dir))
    return out_dir


def plan_shards(config, dtype: torch.dtype, max_shard_bytes: int) -> list[tuple[list[tuple[str, tuple]], int]]:
    """[(the (name, shape) of each source tensor in the shard, the shard's bytes)]: FP8 weights count one byte per
    element, the rest ``dtype``'s size; their scales (a few bytes per row) are left out of the count."""
    from benchmarks.checkpoint import hf_weight_shapes

    shards, current, size = [], [], 0
    for name, shape in hf_weight_shapes(config).items():
        nbytes = math.prod(shape) * (1 if _is_fp8_weight(name) else dtype.itemsize)
        if current and size + nbytes > max_shard_bytes:
            shards.append((current, size))
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append((current, size))
    return shards


def checkpoint_bytes(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """About the bytes write_fp8_checkpoint writes for ``config`` (without scales and headers)."""
    return sum(nbytes for _, nbytes in plan_shards(config, dtype, 1 << 62))


def _is_fp8_weight(name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and module.rsplit(".", 1)[-1] in _LINEARS


def _random(shape, std: float, is_norm: bool, generator: torch.Generator, device: str) -> torch.Tensor:
    tensor = std * torch.randn(shape, generator=generator, device=device)
    return tensor + 1.0 if is_norm else tensor


def _quantized(module: str, weight: torch.Tensor, producer: str, weight_scale: str, static: bool,
               scale_dtype: torch.dtype, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One linear's tensors: e4m3 weight, its scale(s), and a static input scale where the scheme has one."""
    amax = weight.abs().amax(dim=1, keepdim=True) if weight_scale == "channel" else weight.abs().amax()
    scale = (amax / FP8_MAX).to(scale_dtype).float()  # what the file holds is what the codes were divided by
    out = {f"{module}.weight": (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)}
    if weight_scale == "tensor":
        scale = scale.reshape(1) if producer == "compressed-tensors" else scale.reshape(())
    elif producer == "modelopt":
        scale = scale.reshape(-1)  # [out]
    out[f"{module}.weight_scale"] = scale.to(scale_dtype)
    if static:  # a calibrated activation range wide enough for random weights: absmax 8..16 (no saturation)
        input_scale = (8.0 + 8.0 * torch.rand((), generator=generator, device=weight.device)) / FP8_MAX
        out[f"{module}.input_scale"] = input_scale.reshape(1 if producer == "compressed-tensors" else ()).to(
            scale_dtype)
    return out


def _kv_scales(attention: str, producer: str, scale_dtype: torch.dtype, generator: torch.Generator,
               device: str) -> dict[str, torch.Tensor]:
    k, v = (8.0 + 8.0 * torch.rand(2, generator=generator, device=device)) / FP8_MAX  # K/V absmax 8..16
    if producer == "compressed-tensors":
        return {f"{attention}.k_scale": k.reshape(1).to(scale_dtype), f"{attention}.v_scale": v.reshape(1).to(
            scale_dtype)}
    return {f"{attention}.k_proj.k_scale": k.reshape(()).float(), f"{attention}.v_proj.v_scale": v.reshape(()).float()}


def _save_shard(tensors: dict[str, torch.Tensor], out_dir: Path, file: str, where: Path) -> None:
    from safetensors.torch import save_file

    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(where / file), metadata={"format": "pt"})
    if where.resolve() != out_dir.resolve():
        os.symlink(where.resolve() / file, out_dir / file)
