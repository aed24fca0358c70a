"""Per-sequence sampling parameters as rows of preallocated numpy arrays (the persistent batch's sampling part).

A sequence's row is written once, when it joins the batch (SamplingParams never change); a step's SamplingBatch
is then a fancy index of the rows that sample, plus one host->device copy per dtype. Nothing is derived per step
per sequence except what changes: the position being sampled and, for the rare rows with min_tokens, whether
the end-of-sequence ids are still banned.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence as Seq

import numpy as np
import torch

if TYPE_CHECKING:
    from optimum_nvidia_core.engine.sequence import Sequence
    from optimum_nvidia_core.layers.sampler import SamplingBatch
    from optimum_nvidia_core.layers.token_bitmask import TokenBitmask

GREEDY_BELOW = 1e-5  # temperatures this small are treated as greedy (the division would only add rounding)
# Columns of SamplingTable.floats, in the order SamplingBatch unpacks them.
FLOAT_COLUMNS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "greedy")


class SamplingTable:
    def __init__(self, num_rows: int):
        self.floats = np.zeros((num_rows, len(FLOAT_COLUMNS)), dtype=np.float32)
        self.top_k = np.zeros(num_rows, dtype=np.int64)
        self.seed = np.zeros(num_rows, dtype=np.int64)
        self.sampled = np.zeros(num_rows, dtype=bool)  # not greedy
        self.truncates = np.zeros(num_rows, dtype=bool)  # a sampled row with top-k or top-p: needs the sort
        self.uses_min_p = np.zeros(num_rows, dtype=bool)
        self.penalizes_prompt = np.zeros(num_rows, dtype=bool)  # repetition penalty: needs the prompt ids
        self.penalizes_output = np.zeros(num_rows, dtype=bool)  # any penalty: needs the output ids
        self.min_tokens = np.zeros(num_rows, dtype=np.int64)
        self.num_logprobs = np.full(num_rows, -1, dtype=np.int64)  # -1: none asked for
        self.banned_ids: list[tuple[int, ...]] = [()] * num_rows  # EOS / stop ids, banned below min_tokens

    def write(self, row: int, seq: "Sequence", eos_token_ids: Seq[int]) -> None:
        """Derive row's values from seq's SamplingParams and seed (once per sequence and row)."""
        p = seq.params
        greedy = p.temperature < GREEDY_BELOW
        self.floats[row] = (1.0 if greedy else p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                            p.presence_penalty, p.frequency_penalty, float(greedy))
        self.top_k[row] = p.top_k
        self.seed[row] = seq.seed
        self.sampled[row] = not greedy
        self.truncates[row] = not greedy and (p.top_k > 0 or p.top_p < 1.0)
        self.uses_min_p[row] = not greedy and p.min_p > 0.0
        self.penalizes_prompt[row] = p.repetition_penalty != 1.0
        self.penalizes_output[row] = bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)
        self.min_tokens[row] = p.min_tokens
        self.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        self.banned_ids[row] = tuple(sorted(banned)) if p.min_tokens else ()

    def batch(self, rows: np.ndarray, positions: np.ndarray, seqs: list["Sequence"], device: torch.device | str,
              token_bitmask: "TokenBitmask | None" = None) -> "SamplingBatch":
        """The SamplingBatch of `rows` (int64 [R] table rows, one per sampling sequence `seqs[k]`), sampling the
        token at `positions` (int64 [R]). When every row is greedy with no penalty, ban or logprobs, no tensor is
        built: argmax only."""
        from optimum_nvidia_core.layers.sampler import SamplingBatch, padded_ids

        logprobs = self.num_logprobs[rows]
        batch = SamplingBatch(token_bitmask=token_bitmask, all_greedy=not self.sampled[rows].any(),
                              num_logprobs=tuple(None if n < 0 else int(n) for n in logprobs)
                              if (logprobs >= 0).any() else ())
        banned = [(k, self.banned_ids[rows[k]]) for k in np.flatnonzero(self.min_tokens[rows] > 0).tolist()
                  if self.banned_ids[rows[k]] and seqs[k].num_output_tokens < self.min_tokens[rows[k]]]
        if banned:
            per_row = [()] * len(seqs)
            for k, ids in banned:
                per_row[k] = ids
            batch.banned_token_ids = padded_ids([list(ids) for ids in per_row], device)
        penalizes = bool(self.penalizes_output[rows].any())
        if batch.all_greedy and not penalizes:
            return batch
        # Two host->device copies for all per-row values: floats [R, 7] and ints [R, 3].
        floats = torch.from_numpy(self.floats[rows]).to(device, non_blocking=True)
        ints = torch.from_numpy(np.stack([self.top_k[rows], self.seed[rows], positions], axis=1))
        ints = ints.to(device, non_blocking=True)
        (batch.temperature, batch.top_p, batch.min_p, batch.repetition_penalty, batch.presence_penalty,
         batch.frequency_penalty, greedy) = floats.unbind(1)
        batch.is_greedy = greedy > 0.5
        batch.top_k, batch.seeds, batch.positions = ints.unbind(1)
        batch.any_min_p = bool(self.uses_min_p[rows].any())
        truncated = np.flatnonzero(self.truncates[rows])
        if truncated.size:
            batch.top_k_top_p_rows = torch.from_numpy(truncated.astype(np.int64)).to(device, non_blocking=True)
        if self.penalizes_prompt[rows].any():
            batch.prompt_token_ids = padded_ids([seq.token_ids[: seq.num_prompt_tokens] for seq in seqs], device)
        if penalizes:
            batch.output_token_ids = padded_ids([seq.output_token_ids for seq in seqs], device)
        return batch


def sampling_batch(seqs: list["Sequence"], device: torch.device | str, eos_token_ids: Seq[int] = (),
                   token_bitmask: "TokenBitmask | None" = None) -> "SamplingBatch":
    """The batch of `seqs`, each sampling its next token, from a throw-away table (the engine keeps a persistent
    SamplingTable and calls its ``batch`` directly)."""
    table = SamplingTable(len(seqs))
    for row, seq in enumerate(seqs):
        table.write(row, seq, eos_token_ids)
    positions = np.array([seq.num_tokens for seq in seqs], dtype=np.int64)
    return table.batch(np.arange(len(seqs)), positions, seqs, device, token_bitmask)
