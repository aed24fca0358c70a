"""Run whole sequences through the model outside the engine, with a scratch paged KV cache.

Calibration and perplexity need plain prefills. The model's forward reads its KV cache from the attention layers
(``k_cache``/``v_cache`` [num_blocks, block_size, num_kv_heads, head_dim]) and the batch layout from an
AttentionMetadata, so this module builds both: each sequence gets its own contiguous run of blocks. The caches the
layers held before (the engine's) are put back afterwards.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from optimum_nvidia_core.attention_metadata import AttentionMetadata

BLOCK_SIZE = 16


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype: those of the first floating-point parameter or buffer that is not FP8."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and tensor.element_size() > 1:
            return tensor.device, tensor.dtype
    raise ValueError("the model has no floating-point parameters; cannot tell its compute dtype")


@contextmanager
def scratch_kv_cache(model: nn.Module, num_blocks: int, kv_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Give every attention layer a zeroed cache of ``num_blocks`` blocks; restore the old caches on exit."""
    device, dtype = model_device_dtype(model)
    layers = model.attention_layers()
    saved = [(layer.k_cache, layer.v_cache) for layer in layers] if all(
        hasattr(layer, "k_cache") for layer in layers) else None
    for layer in layers:
        shape = (num_blocks, BLOCK_SIZE, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(shape, dtype=kv_dtype or dtype, device=device)
        layer.v_cache = torch.zeros(shape, dtype=kv_dtype or dtype, device=device)
    try:
        yield
    finally:
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = saved[i] if saved else (None, None)


def build_metadata(
    spans: list[tuple[int, int]], first_blocks: list[int], max_blocks: int, device: torch.device
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Layout for sequences whose tokens [start, end) are computed this step (tokens before start are cached).

    Sequence i owns blocks first_blocks[i] .. first_blocks[i] + max_blocks - 1. Returns positions [T] and metadata.
    """
    positions, slots, block_rows = [], [], []
    for (start, end), first in zip(spans, first_blocks):
        positions.extend(range(start, end))
        slots.extend(first * BLOCK_SIZE + p for p in range(start, end))  # blocks are contiguous per sequence
        block_rows.append(list(range(first, first + max_blocks)))
    query_lens = [end - start for start, end in spans]
    context_lens = [end for _, end in spans]
    query_start_loc = [0]
    for length in query_lens:
        query_start_loc.append(query_start_loc[-1] + length)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(block_rows, dtype=torch.int32, device=device),
        max_query_len=max(query_lens), max_context_len=max(context_lens),
        query_lens_host=query_lens, context_lens_host=context_lens,
    )
    return torch.tensor(positions, dtype=torch.int64, device=device), metadata


@torch.no_grad()
def prefill(model: nn.Module, sequences: list[list[int]], kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One forward pass over whole sequences (a batch of prefills). Returns hidden states [sum(len), hidden]."""
    device, _ = model_device_dtype(model)
    blocks_per_seq = max(math.ceil(len(ids) / BLOCK_SIZE) for ids in sequences)
    firsts = [i * blocks_per_seq for i in range(len(sequences))]
    with scratch_kv_cache(model, blocks_per_seq * len(sequences), kv_dtype):
        positions, metadata = build_metadata([(0, len(ids)) for ids in sequences], firsts, blocks_per_seq, device)
        input_ids = torch.tensor([t for ids in sequences for t in ids], dtype=torch.int64, device=device)
        return model(input_ids, positions, metadata)


@torch.no_grad()
def chunked_prefill(
    model: nn.Module, token_ids: list[int], chunk_size: int = 512, kv_dtype: torch.dtype | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Prefill one sequence chunk by chunk, as the engine does; yields (start, hidden [chunk, hidden]).

    Each chunk attends to all earlier tokens through the paged cache, so peak memory follows the chunk size."""
    device, _ = model_device_dtype(model)
    num_blocks = math.ceil(len(token_ids) / BLOCK_SIZE)
    with scratch_kv_cache(model, num_blocks, kv_dtype):
        for start in range(0, len(token_ids), chunk_size):
            end = min(start + chunk_size, len(token_ids))
            positions, metadata = build_metadata([(start, end)], [0], num_blocks, device)
            input_ids = torch.tensor(token_ids[start:end], dtype=torch.int64, device=device)
            yield start, model(input_ids, positions, metadata)
