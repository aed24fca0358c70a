"""The device half of a speculative verify step: logits at each sampling row's positions, sampled as plain
decoding samples them, and the accepted run of each proposal (``layers/rejection_sampler``).

The forward is an ordinary ragged step: ``input_batch`` lays out a verify row's query as its last token then its
proposal, and the model runner replays a mixed-batch CUDA graph when the step fits one (else it runs eagerly).
What differs is after the forward: every sampling row is widened to W = 1 + the step's longest proposal
positions. A row with a shorter proposal (or none: a prefill that completes, a decode without a match) repeats
its last position; the -1 padding of its draft rejects those positions, so it emits plain decoding's token.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..layers.rejection_sampler import accept, expand_for_verify
from ..layers.token_bitmask import TokenBitmask

if TYPE_CHECKING:
    from .input_batch import StepInputs
    from .scheduler import ScheduledBatch


def padded_drafts(draft_token_ids: list[list[int]], rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The proposals of the sampling rows (batch indices `rows`) as int64 [R, W - 1], -1 padded, and their lengths
    int64 [R]."""
    lengths = np.array([len(draft_token_ids[i]) for i in rows], dtype=np.int64)
    drafts = np.full((len(rows), max(1, int(lengths.max()))), -1, dtype=np.int64)
    for k, i in enumerate(rows):
        drafts[k, : lengths[k]] = draft_token_ids[i]
    return drafts, lengths


def verify(runner, hidden: torch.Tensor, inputs: "StepInputs", batch: "ScheduledBatch",
           rows: list[int], seqs: list, allowed: TokenBitmask | None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, H] of a verify step -> (int64 [R, W + 1] on the device: each sampling row's emitted tokens, -1
    padded, then their count in the last column; int64 [R]: each row's first emitted token). ``runner``: the
    ModelRunner (its model, sampler and sampling table)."""
    drafts, lengths = padded_drafts(batch.draft_token_ids, rows)
    width = drafts.shape[1] + 1
    last = np.cumsum(batch.num_query_tokens)[inputs.sample_index] - 1  # [R]: each row's last query token
    index = np.minimum((last - lengths)[:, None] + np.arange(width)[None, :], last[:, None])  # [R, W]
    device = hidden.device
    index_t = torch.from_numpy(index.reshape(-1)).to(device, non_blocking=True)
    drafts_t = torch.from_numpy(drafts).to(device, non_blocking=True)
    logits = runner.model.compute_logits(hidden.index_select(0, index_t))  # [R * W, V]
    # Position j of a row samples the token after its j-th proposed token: plain decoding's position + j.
    sampling = runner.input_batch.sampling.batch(inputs.sample_rows, inputs.sample_positions - lengths, seqs, device)
    sampling = expand_for_verify(sampling, drafts_t)
    if allowed is not None:  # guided rows never propose: their mask constrains their position 0 only
        mask_rows = allowed.rows if allowed.rows is not None else torch.arange(allowed.words.shape[0], device=device)
        sampling.token_bitmask = TokenBitmask(allowed.words, mask_rows * width)
    target = runner.sampler(logits, sampling).token_ids
    target = torch.where(logits.sum(dim=-1).isfinite(), target, -1).view(len(rows), width)  # -1: non-finite
    out = accept(target, drafts_t)
    return torch.cat([out.token_ids, out.num_emitted[:, None]], dim=1), out.token_ids[:, 0]


def unpack_runs(values: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """The host copy of ``verify``'s first result -> each row's emitted tokens, and each row's last one [R]."""
    counts = values[:, -1]
    last = values[np.arange(len(values)), counts - 1]
    return [row[:n] for row, n in zip(values[:, :-1].tolist(), counts.tolist())], last
