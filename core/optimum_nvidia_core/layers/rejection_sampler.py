"""Verification of speculative proposals: which of a row's k proposed tokens the target model keeps.

A verify step runs the target model on each row's last token plus its k proposed tokens, giving logits at k + 1
positions. Position j is sampled exactly as plain decoding would sample it (the same ``Sampler``: penalties, bans,
grammar mask, temperature, top-k/p, min-p, and the seeded uniform of (seed, position j)); the proposal is kept
while it equals those tokens, and the first disagreeing target token (or, when all k are kept, the bonus token at
position k) ends the row. So the emitted tokens are, token for token, the tokens plain decoding would emit: for
greedy rows that is the argmax, for seeded sampled rows the same draw.

For sampled rows this is standard speculative rejection sampling with a deterministic draft (q = one-hot at the
proposed token x), done with shared randomness: the inverse-CDF draw from p with uniform u equals x with
probability p(x) (accept), and given that it is not x it is distributed as p with x removed and renormalized (the
residual max(p - q, 0)). The output keeps the target distribution exactly, and seeded requests reproduce their
non-speculative output.

Per row tensors, no host sync: tokens and counts stay on the device for the step's one copy.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .sampler import Sampler, SamplingBatch


@dataclass
class VerifyOutput:
    token_ids: torch.Tensor  # int64 [S, k + 1]: emitted tokens, -1 past each row's num_emitted
    num_emitted: torch.Tensor  # int64 [S]: accepted proposals + 1 (the correction or bonus token), in [1, k + 1]

    @property
    def num_accepted(self) -> torch.Tensor:
        return self.num_emitted - 1


class RejectionSampler:
    def __init__(self, sampler: Sampler | None = None):
        self.sampler = sampler or Sampler()

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, draft_token_ids: torch.Tensor, batch: SamplingBatch) -> VerifyOutput:
        """logits: float [S, k + 1, V], row i's position j predicting the token after its j-th proposal (j = 0: after
        its last real token). draft_token_ids: int64 [S, k], -1 past a row's proposals (a row with none is a plain
        decode step). batch: the rows' SamplingBatch with one row per position (``expand_for_verify``)."""
        num_seqs, width, vocab = logits.shape
        target = self.sampler(logits.reshape(num_seqs * width, vocab), batch).token_ids.view(num_seqs, width)
        return accept(target, draft_token_ids)


def accept(target_token_ids: torch.Tensor, draft_token_ids: torch.Tensor) -> VerifyOutput:
    """target [S, k + 1] (what plain decoding picks at each position), draft [S, k] (-1 padded) -> the longest
    agreeing prefix of the draft, then the target's token at the first disagreement (or the bonus at k)."""
    agree = draft_token_ids == target_token_ids[:, :-1]  # -1 padding never agrees: a row ends at its proposals
    num_accepted = agree.long().cumprod(dim=1).sum(dim=1)  # [S]
    position = torch.arange(target_token_ids.shape[1], device=target_token_ids.device)
    tokens = target_token_ids.masked_fill(position[None, :] > num_accepted[:, None], -1)
    return VerifyOutput(tokens, num_accepted + 1)


def greedy_verify(logits: torch.Tensor, draft_token_ids: torch.Tensor) -> VerifyOutput:
    """All rows greedy with no penalty or mask (the common case): argmax at each position, then ``accept``."""
    return accept(logits.argmax(dim=-1), draft_token_ids)


_PER_ROW = ("temperature", "is_greedy", "top_k", "top_p", "min_p", "seeds", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "prompt_token_ids", "banned_token_ids")


def expand_for_verify(batch: SamplingBatch, draft_token_ids: torch.Tensor) -> SamplingBatch:
    """A batch of S rows -> S * (k + 1) rows, row i * (k + 1) + j sampling position i's j-th verify position:
    the same parameters, position + j (so seeded draws match plain decoding), and the output so far extended by
    the first j proposals (output penalties see them as plain decoding would, had they been accepted). Bans
    (EOS before min_tokens) are copied unchanged: a row below min_tokens must not speculate past it (the
    scheduler caps its proposal). A grammar's token bitmask cannot be expanded here (the grammar has to advance
    through the proposal): the caller passes one mask row per position, or speculation is off for that row."""
    if batch.token_bitmask is not None:
        raise ValueError("expand_for_verify: a grammar mask needs one row per verify position; build it from "
                         "the grammar advanced through each proposal, and set token_bitmask after expanding")
    width = draft_token_ids.shape[1] + 1
    expanded = {f.name: getattr(batch, f.name) for f in fields(batch)}
    for name in _PER_ROW:
        value = expanded[name]
        if value is not None:
            expanded[name] = value.repeat_interleave(width, dim=0)
    offsets = torch.arange(width, device=draft_token_ids.device)
    if batch.positions is not None:
        expanded["positions"] = (batch.positions[:, None] + offsets[None, :]).reshape(-1)
    if batch.output_token_ids is not None:
        expanded["output_token_ids"] = _outputs_with_prefixes(batch.output_token_ids, draft_token_ids)
    if batch.top_k_top_p_rows is not None:
        expanded["top_k_top_p_rows"] = (batch.top_k_top_p_rows[:, None] * width + offsets[None, :]).reshape(-1)
    expanded["num_logprobs"] = tuple(n for n in batch.num_logprobs for _ in range(width))
    return replace(batch, **expanded)


def _outputs_with_prefixes(outputs: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """outputs [S, L] (-1 padded), drafts [S, k] -> [S * (k + 1), L + k]: row (i, j) = outputs[i] then drafts[i, :j]
    (where the padding sits in between does not matter: the penalties count ids, not positions)."""
    num_seqs, k = drafts.shape
    width = k + 1
    keep = torch.arange(k, device=drafts.device)[None, :] < torch.arange(width, device=drafts.device)[:, None]
    prefixes = drafts[:, None, :].where(keep[None, :, :], -1)  # [S, k + 1, k]
    base = outputs[:, None, :].expand(num_seqs, width, outputs.shape[1])
    return torch.cat([base, prefixes], dim=2).reshape(num_seqs * width, -1)
