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
from optimum_nvidia_core.devices import model_device_dtype

BLOCK_SIZE = 16


@contextmanager
def scratch_kv_cache(model: nn.Module, num_blocks: int, kv_dtype: torch.dtype | None = None,
                     layers: list[nn.Module] | None = None) -> Iterator[None]:
    """Give every attention layer (or only ``layers``) a zeroed cache of ``num_blocks`` blocks; restore the old
    caches on exit. ``model`` may be a single decoder layer: it gives the device and dtype."""
    device, dtype = model_device_dtype(model)
    layers = model.attention_layers() if layers is None else layers
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
    block_rows = [list(range(first, first + max_blocks)) for first in first_blocks]  # contiguous per sequence
    query_lens = [end - start for start, end in spans]
    context_lens = [end for _, end in spans]
    return AttentionMetadata.build(block_rows, query_lens, context_lens, BLOCK_SIZE, device)


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
