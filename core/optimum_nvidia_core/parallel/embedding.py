"""Vocab-parallel token embedding and LM head: rank r holds rows ``plan.vocab(r)`` of the vocab padded up to a
multiple of the rank count (padding rows are zeros).

The embedding looks up the ids that fall in its rows (zeros elsewhere) and one all-reduce sums the ranks' rows.
The LM head computes its slice of the logits and one all-gather joins them; the padding columns are dropped.
Tied embeddings share the one sharded matrix, as the full model shares the full one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# One tensor in, the ranks' tensors stacked along dim 0 out (torch >= 2.13 renamed all_gather_into_tensor).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def vocab_rows(full_weight: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows `rows` of a [vocab, H] matrix, zero rows where they pass the end of the vocab."""
    weight = full_weight.detach()
    shard = torch.zeros(rows.stop - rows.start, weight.shape[1], dtype=weight.dtype, device=weight.device)
    kept = weight[rows.start:min(rows.stop, weight.shape[0])]
    shard[: kept.shape[0]] = kept
    return shard


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: nn.Parameter, first_row: int, group=None):
        super().__init__()
        self.weight = weight  # [vocab_per_rank, H]
        self.first_row = first_row
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids [T] -> [T, H], the same on every rank
        local = input_ids - self.first_row
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(out, group=self.group)
        return out

    def extra_repr(self) -> str:
        return f"rows={self.first_row}..{self.first_row + self.weight.shape[0]}"


class ParallelLMHead(nn.Module):
    """hidden [N, H] -> logits [N, vocab_size] float32, the same on every rank."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, world_size: int, group=None):
        super().__init__()
        self.weight = weight  # [vocab_per_rank, H]
        self.vocab_size, self.world_size, self.group = vocab_size, world_size, group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight).float()  # [N, vocab_per_rank]
        rows = local.shape[0]
        gathered = torch.empty((self.world_size * rows, local.shape[1]), dtype=local.dtype, device=local.device)
        _all_gather(gathered, local.contiguous(), group=self.group)
        # [ranks * N, V/ranks] -> [N, padded vocab] -> the real vocab
        return gathered.view(self.world_size, rows, -1).permute(1, 0, 2).reshape(rows, -1)[:, : self.vocab_size]
