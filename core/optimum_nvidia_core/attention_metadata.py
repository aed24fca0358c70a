"""The batch layout every attention layer reads. Built by ModelRunner once per step.

A step is a flat batch of T query tokens from S sequences; prefill chunks and decodes mix freely. Sequence i
owns query tokens ``query_start_loc[i]:query_start_loc[i+1]``; they are its last tokens, so its context after
this step is ``context_lens[i]`` tokens, all of which live in the paged KV cache (shape
[num_blocks, block_size, num_kv_heads, head_dim] per layer for K and for V) at the blocks listed in
``block_tables[i]``.
"""
from __future__ import annotations

from dataclasses import dataclass

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
