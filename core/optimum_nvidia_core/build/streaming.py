"""The FP8 build one decoder layer at a time, so a model whose high-precision weights do not fit the GPU still
builds (Llama-3.1-70B: ~140 GB in bf16, ~70 GB in FP8, on one 141 GB H200).

    embeddings, final norm, LM head: read on the host, cast, written to their own shard (never on the GPU)
    calibration tokens -> embeddings (host) -> activations [T, H] carried on the device
    for each layer i:  checkpoint tensors of layer i (memory-mapped) -> device, compute dtype
                       the carried activations run through layer i with calibration hooks; its outputs are carried on
                       GPTQ / nearest rounding -> Fp8Linear -> the layer's tensors are written to their own shard
                       the layer is freed (back to the meta device)
Peak GPU memory: one high-precision layer + its Hessians + the carried activations (+ one pass's intermediates).

The activations carried are the high-precision model's, so every statistic (and so the engine) is the one the
whole-model build (quantize.quantize_model) computes from the same tokens: tests/unit/test_streaming_build.py checks
that the two builds give the same logits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from optimum_nvidia_core.build.calibration import TOKENS_PER_PASS, CalibrationStats, group_by_tokens, recording
from optimum_nvidia_core.build.checkpoint_reader import CheckpointReader, layer_prefix
from optimum_nvidia_core.build.quantize import Fp8Recipe, kv_scale, quantizable_linear_names, swap_linears
from optimum_nvidia_core.build.scratch_prefill import BLOCK_SIZE, build_metadata, scratch_kv_cache
from optimum_nvidia_core.attention_metadata import AttentionMetadata

INDEX_NAME = "model.safetensors.index.json"
NON_LAYER_SHARD = "model-embeddings.safetensors"
NON_LAYER_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")


def layer_shard(index: int) -> str:
    return f"model-layer-{index:05d}.safetensors"


@dataclass
class CarriedBatch:
    """One calibration pass: its layout (fixed for every layer) and the activations entering the next layer."""

    positions: torch.Tensor  # [T] int64
    metadata: AttentionMetadata
    num_blocks: int  # scratch KV-cache blocks the pass needs
    hidden: torch.Tensor  # [T, H], compute dtype, on the device
    residual: torch.Tensor | None  # [T, H] (None before the first layer)


@torch.no_grad()
def build_streaming(model_dir: Path, recipe: Fp8Recipe, token_lists: list[list[int]] | None, dtype: torch.dtype,
                    device: torch.device, out_dir: Path, progress: bool = True) -> dict:
    """Quantize ``model_dir`` layer by layer into safetensors shards + an index in ``out_dir``.

    Returns the per-layer KV-cache scales {"k": [...], "v": [...]} (all 1.0 unless the recipe has an FP8 KV cache)."""
    from tqdm.auto import tqdm

    from optimum_nvidia_core.models.loader import build_model, load_config, load_weights

    if recipe.needs_calibration and not token_lists:
        raise ValueError("this FP8 recipe needs calibration data (GPTQ rounding, static activation or KV scales); "
                         "pass token lists, or use weight_rounding='nearest', activation_scheme='dynamic' and "
                         "kv_cache_dtype='auto'")
    model = build_model(load_config(model_dir), dtype, "meta")
    reader = CheckpointReader(model_dir, len(model.model.layers))
    weight_map = _write_non_layer_shard(model, reader, out_dir)
    batches = _embed(model, token_lists, device) if recipe.needs_calibration else []
    _free(model.model.embed_tokens, model.model.norm, model.lm_head)
    k_scales, v_scales = [], []
    for i in tqdm(range(len(model.model.layers)), desc="FP8 build", unit="layer", disable=not progress):
        prefix = layer_prefix(i)
        layer = model.model.layers[i].to_empty(device=device)
        load_weights(model, reader.tensors(prefix), prefix=prefix, progress=False)
        stats = _calibrate_layer(model, i, batches, recipe) if batches else None
        swap_linears(model, _layer_linears(model, i, recipe), recipe, stats, progress=False)
        fp8_kv = recipe.kv_cache_dtype == "fp8"
        k_scales.append(kv_scale(stats.k_absmax[0]) if fp8_kv else 1.0)
        v_scales.append(kv_scale(stats.v_absmax[0]) if fp8_kv else 1.0)
        weight_map.update(_write_shard({prefix + n: t for n, t in layer.state_dict().items()}, out_dir,
                                       layer_shard(i)))
        _free(layer)
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return {"k": k_scales, "v": v_scales}


def _write_non_layer_shard(model: nn.Module, reader: CheckpointReader, out_dir: Path) -> dict[str, str]:
    """Embeddings, final norm and (untied) LM head: read and cast on the host, written as they are."""
    from optimum_nvidia_core.models.loader import load_weights

    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        module.to_empty(device="cpu")
    model.tie_weights()
    load_weights(model, reader.non_layer_tensors(), prefix=NON_LAYER_PREFIXES, progress=False)
    state = {n: t for n, t in model.state_dict().items() if n.startswith(NON_LAYER_PREFIXES)}
    if model.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    return _write_shard(state, out_dir, NON_LAYER_SHARD)


def _write_shard(state: dict[str, torch.Tensor], out_dir: Path, file_name: str) -> dict[str, str]:
    from safetensors.torch import save_file

    save_file({n: t.detach().contiguous().cpu() for n, t in state.items()}, str(out_dir / file_name),
              metadata={"format": "pt"})
    return dict.fromkeys(state, file_name)


def _free(*modules: nn.Module) -> None:
    for module in modules:
        module.to_empty(device="meta")


def _embed(model: nn.Module, token_lists: list[list[int]], device: torch.device) -> list[CarriedBatch]:
    """The calibration passes (grouped as the whole-model calibration groups them) and their embeddings."""
    batches = []
    for group in group_by_tokens(token_lists, TOKENS_PER_PASS):
        blocks_per_seq = max(-(-len(ids) // BLOCK_SIZE) for ids in group)
        firsts = [i * blocks_per_seq for i in range(len(group))]
        positions, metadata = build_metadata([(0, len(ids)) for ids in group], firsts, blocks_per_seq, device)
        input_ids = torch.tensor([t for ids in group for t in ids], dtype=torch.int64)
        hidden = model.model.embed_tokens(input_ids).to(device)
        batches.append(CarriedBatch(positions, metadata, blocks_per_seq * len(group), hidden, None))
    return batches


def _calibrate_layer(model: nn.Module, index: int, batches: list[CarriedBatch], recipe: Fp8Recipe
                     ) -> CalibrationStats:
    """Run every batch through layer ``index`` with the recipe's hooks; carry its outputs to the next layer."""
    layer = model.model.layers[index]
    names = _layer_linears(model, index, recipe)
    stats = CalibrationStats()
    attention = [layer.self_attn.attn]
    with recording(model, stats, [n for n in names if recipe.static_input(n)], attention,
                   names if recipe.uses_gptq else []):
        for batch in batches:
            with scratch_kv_cache(layer, batch.num_blocks, layers=attention):
                batch.hidden, batch.residual = layer(batch.hidden, batch.residual, batch.positions, batch.metadata)
    return stats


def _layer_linears(model: nn.Module, index: int, recipe: Fp8Recipe) -> list[str]:
    """The linears of layer ``index`` that the recipe quantizes (full module names)."""
    if not recipe.use_fp8:
        return []
    return [n for n in quantizable_linear_names(model) if n.startswith(layer_prefix(index))]
