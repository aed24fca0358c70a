"""Load a pre-quantized FP8 checkpoint (models/fp8_formats.py) into our model with Fp8Linear modules.

The model is laid out on the meta device, its quantized linears swapped for empty Fp8Linear modules, then
materialized on the device: memory is the FP8 model's own size (a 70B FP8 checkpoint loads on one 141 GB GPU).
The checkpoint streams tensor by tensor: FP8 weights and their scales are routed here (into the row slices of the
fused projections), everything else (embeddings, norms, high-precision linears) goes through the loader's usual
path and checks. Nothing may be missing: every FP8 weight needs its scale, every static linear its input scale,
every layer its KV scales when the format declares them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..layers.fp8_linear import FP8_DTYPE, MIN_SCALE, Fp8Linear
from ..models.fp8_formats import Fp8CheckpointFormat, UnsupportedFp8Checkpoint

_KV_NAME = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(?:k_proj\.|v_proj\.)?(k|v|kv)_(?:scale)$")
_OUTPUT_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k|v)_proj\.output_scale$")  # older llm-compressor
_LEAVES = ("weight", "weight_scale", "input_scale", "bias", "weight_zero_point", "input_zero_point")


def load_fp8_checkpoint(model_dir: Path, fmt: Fp8CheckpointFormat, dtype: torch.dtype, device: torch.device | str,
                        kv_cache_dtype: str = "auto") -> nn.Module:
    """Our model for an FP8 checkpoint, on ``device``; ``kv_cache_dtype="fp8"`` needs the checkpoint's KV scales."""
    from .quantize import check_fp8_supported, set_kv_scales
    from ..models.loader import _count_tensors, build_model, checkpoint_tensors, load_config, load_weights

    device = torch.device(device)
    check_fp8_supported(device)
    if kv_cache_dtype == "fp8" and not fmt.kv_cache:
        raise UnsupportedFp8Checkpoint(
            f"kv_cache_dtype='fp8' needs FP8 KV-cache scales, and this {fmt.producer} checkpoint has none (its "
            "quantization config declares no KV-cache scheme). Use kv_cache_dtype='auto', or a checkpoint "
            "quantized with an FP8 KV cache.")
    model = build_model(load_config(model_dir), dtype, "meta")
    router = _Fp8Router(model, fmt, dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, router.route(checkpoint_tensors(Path(model_dir))), total=_count_tensors(Path(model_dir)))
    router.finish()
    if fmt.kv_cache:
        set_kv_scales(model, *router.kv_scales(len(model.attention_layers())))
    return model.eval()


class _Fp8Router:
    """Swaps the quantized linears for Fp8Linear (on meta) and fills them from the tensors that belong to them."""

    def __init__(self, model: nn.Module, fmt: Fp8CheckpointFormat, dtype: torch.dtype):
        from ..layers.linear import Linear

        self.model, self.fmt = model, fmt  # the modules stay the same objects when the model is materialized
        self.parts: dict[str, tuple[str, slice]] = {}  # HF module name -> (our fused module name, rows)
        self.pending: set[tuple[str, str]] = set()  # (HF module name, leaf) still to come
        self.input_scales: dict[str, float] = {}  # our module -> max over its parts
        self.kv: dict[tuple[int, str], float] = {}
        fused_parts: dict[str, list[str]] = {}
        for part, (fused, _) in model.packed_modules.items():
            fused_parts.setdefault(fused, []).append(part)
        for name, module in list(model.named_modules()):
            if not isinstance(module, Linear) or name == "lm_head":
                continue
            owner, _, leaf = name.rpartition(".")
            hf_names = [f"{owner}.{p}" for p in fused_parts.get(leaf, [leaf])]
            quantized = [fmt.is_quantized(n) for n in hf_names]
            if not any(quantized):
                continue
            if not all(quantized):
                raise UnsupportedFp8Checkpoint(
                    f"the checkpoint keeps only some of {hf_names} in high precision ({fmt.producer} ignore list); "
                    "this engine fuses them into one projection, which must be all FP8 or all high precision")
            for shard, hf_name in enumerate(hf_names):
                self.parts[hf_name] = (name, module.shard_rows(shard) if len(hf_names) > 1 else slice(None))
                leaves = ["weight", "weight_scale"] + (["input_scale"] if fmt.static_activations else []) + (
                    ["bias"] if module.bias is not None else [])
                self.pending.update((hf_name, leaf) for leaf in leaves)
            out_features, in_features = module.weight.shape
            model.set_submodule(name, Fp8Linear(in_features, out_features, bias=module.bias is not None,
                                                per_channel=True, static_input_scale=fmt.static_activations,
                                                bias_dtype=dtype, device="meta"))

    def route(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Take the FP8 tensors (and KV scales) as they stream by; yield the others to the usual loader."""
        for name, tensor in tensors:
            hf_module, _, leaf = name.rpartition(".")
            if hf_module in self.parts and leaf in _LEAVES:
                self._take(name, hf_module, leaf, tensor)
            elif (match := _KV_NAME.match(name) or _OUTPUT_SCALE.match(name)) is not None:
                for kind in ("k", "v") if match.group(2) == "kv" else (match.group(2),):
                    self.kv[(int(match.group(1)), kind)] = _scalar(name, tensor)
            else:
                yield name, tensor

    @torch.no_grad()
    def _take(self, name: str, hf_module: str, leaf: str, tensor: torch.Tensor) -> None:
        fused, rows = self.parts[hf_module]
        module = self.model.get_submodule(fused)
        if leaf.endswith("zero_point"):
            if torch.count_nonzero(tensor):
                raise UnsupportedFp8Checkpoint(f"{name} is not zero: asymmetric FP8 is not supported")
            return
        destination = {"weight": module.weight, "weight_scale": module.weight_scale, "bias": module.bias}.get(leaf)
        if leaf == "input_scale":
            self.input_scales[fused] = max(self.input_scales.get(fused, 0.0), _scalar(name, tensor))
        elif leaf == "weight":
            if tensor.dtype != FP8_DTYPE:
                raise UnsupportedFp8Checkpoint(
                    f"{name} is {str(tensor.dtype).removeprefix('torch.')}, not float8_e4m3fn: only e4m3 FP8 weights "
                    "are supported")
            _copy(name, destination[rows], tensor)
        elif leaf == "weight_scale":
            target = destination[rows]
            if tensor.numel() == 1:
                target.fill_(_scalar(name, tensor))  # a per-tensor scale for every row of this part
            else:
                _copy(name, target, tensor.reshape(-1).float())
        else:
            _copy(name, destination[rows], tensor)
        self.pending.discard((hf_module, leaf))

    def finish(self) -> None:
        if self.pending:
            missing = sorted(f"{module}.{leaf}" for module, leaf in self.pending)
            raise ValueError(f"FP8 checkpoint is incomplete: missing {missing[:5]} ({len(missing)} in all). Copy "
                             "the missing safetensors shards, or check that config.json belongs to these weights.")
        for fused, value in self.input_scales.items():
            self.model.get_submodule(fused).input_scale.fill_(max(value, MIN_SCALE))

    def kv_scales(self, num_layers: int) -> tuple[list[float], list[float]]:
        missing = [f"layer {i} {kind}_scale" for i in range(num_layers) for kind in "kv" if (i, kind) not in self.kv]
        if missing:
            raise ValueError(f"the {self.fmt.producer} checkpoint declares an FP8 KV cache but has no KV scales for "
                             f"{missing[:4]}; the files are incomplete")
        return [self.kv[(i, "k")] for i in range(num_layers)], [self.kv[(i, "v")] for i in range(num_layers)]


def _scalar(name: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise UnsupportedFp8Checkpoint(f"{name} has shape {tuple(tensor.shape)}: only one scale per tensor is "
                                       "supported there")
    return float(tensor.float())


def _copy(name: str, destination: torch.Tensor, tensor: torch.Tensor) -> None:
    if destination.numel() != tensor.numel():
        raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                         f"{tuple(destination.shape)}: config.json does not match the weights")
    destination.copy_(tensor.reshape(destination.shape))
