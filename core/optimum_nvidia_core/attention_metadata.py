"""The batch layout every attention layer reads, and the one place that assembles it from block tables.

A step is a flat batch of T query tokens from S sequences; prefill chunks and decodes mix freely. Sequence i
owns query tokens ``query_start_loc[i]:query_start_loc[i+1]``; they are its last tokens, so its context after
this step is ``context_lens[i]`` tokens, all of which live in the paged KV cache (shape
[num_blocks, block_size, num_kv_heads, head_dim] per layer for K and for V) at the blocks listed in
``block_tables[i]``. A neutral module (torch and numpy only): kernels, layers, engine and build all read it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) for each new token's K/V
    query_start_loc: torch.Tensor  # [S + 1] int32: cumulative query lengths
    context_lens: torch.Tensor  # [S] int32: tokens in the cache after this step, new ones included
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0 past each sequence's blocks
    max_query_len: int
    max_context_len: int
    # Host copies, so the CPU reference path needs no device->host sync.
    query_lens_host: list[int]
    context_lens_host: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(cls, block_tables: list[list[int]] | np.ndarray, query_lens: list[int], context_lens: list[int],
              block_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, "AttentionMetadata"]:
        """positions [T] int64 and the metadata of sequences that compute their last query_lens[i] tokens of
        context_lens[i], with KV in the blocks block_tables[i] (lists padded here, or an int [S, W] array)."""
        tables = padded_tables(block_tables)
        q = np.asarray(query_lens, dtype=np.int64)
        ctx = np.asarray(context_lens, dtype=np.int64)
        positions, slots, starts = paged_layout(q, ctx, tables, block_size)
        as_tensor = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)  # noqa: E731
        metadata = cls(
            slot_mapping=as_tensor(slots, torch.int64), query_start_loc=as_tensor(starts, torch.int32),
            context_lens=as_tensor(ctx, torch.int32), block_tables=as_tensor(tables, torch.int32),
            max_query_len=int(q.max()), max_context_len=int(ctx.max()),
            query_lens_host=q.tolist(), context_lens_host=ctx.tolist(),
        )
        return as_tensor(positions, torch.int64), metadata


def paged_layout(query_lens: np.ndarray, context_lens: np.ndarray, block_tables: np.ndarray,
                 block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 [S] query and context lengths, int [S, W] block tables -> positions [T], slot_mapping [T] (each
    query token's cache slot) and query_start_loc [S + 1], all int64, computed with vector operations."""
    starts = np.zeros(len(query_lens) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=starts[1:])
    first = context_lens - query_lens  # position of each sequence's first query token
    if starts[-1] == len(query_lens):  # one token each (decode): no repeat needed
        positions, token_rows = first, np.arange(len(query_lens))
    else:
        token_rows = np.repeat(np.arange(len(query_lens)), query_lens)
        positions = np.arange(starts[-1], dtype=np.int64) + (first - starts[:-1])[token_rows]
    blocks = block_tables[token_rows, positions // block_size].astype(np.int64)
    return positions, blocks * block_size + positions % block_size, starts


def padded_tables(block_tables: list[list[int]] | np.ndarray) -> np.ndarray:
    """Block tables as an int32 [S, W] array, each row padded with 0 past its blocks."""
    if isinstance(block_tables, np.ndarray):
        return block_tables
    width = max(1, max(len(t) for t in block_tables))
    tables = np.zeros((len(block_tables), width), dtype=np.int32)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = table
    return tables
