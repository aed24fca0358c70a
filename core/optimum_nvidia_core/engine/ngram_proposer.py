"""Prompt-lookup (n-gram) proposals for speculative decoding: no draft model, the draft is copied from the text.

For a sequence's tokens so far (prompt + output), find the longest suffix of n tokens (``prompt_lookup_max``
down to ``prompt_lookup_min``, vLLM's names) that occurred earlier, take its most recent earlier occurrence, and
propose the (up to) k tokens that followed it. RAG answers and summaries copy their passages, so the copy is often
right; the target model verifies every proposed token in one step, so a wrong copy costs only the wasted slots.

Torch-free (numpy), like the scheduler: the engine calls it per step per speculating sequence on the host. Cost:
one vectorized comparison over the last ``window`` tokens, then a [C, max_n] comparison over the C places where
the last token occurred before.
"""
from __future__ import annotations

from collections.abc import Sequence as TokenIds
from dataclasses import dataclass

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class NgramProposer:
    num_speculative_tokens: int  # k: at most this many tokens proposed per step
    prompt_lookup_max: int = 4  # longest suffix tried
    prompt_lookup_min: int = 1  # shortest suffix accepted as a match
    window: int = 4096  # only the last `window` tokens are searched (bounds the per-step host cost)

    def __post_init__(self):
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"prompt_lookup_min={self.prompt_lookup_min}, prompt_lookup_max={self.prompt_lookup_max}")
        if self.window <= self.prompt_lookup_max:
            raise ValueError(f"window ({self.window}) must exceed prompt_lookup_max ({self.prompt_lookup_max})")

    def propose(self, token_ids: TokenIds[int] | np.ndarray, max_tokens: int | None = None) -> np.ndarray:
        """token_ids: the sequence so far. Returns int64 [m], 0 <= m <= min(k, max_tokens): the proposal, empty
        when no suffix of at least prompt_lookup_min tokens occurred before. ``max_tokens`` caps it (e.g. the
        tokens left before max_tokens or the model's length)."""
        k = self.num_speculative_tokens if max_tokens is None else min(self.num_speculative_tokens, max_tokens)
        tokens = np.asarray(token_ids, dtype=np.int64)[-self.window:]
        length = len(tokens)
        if k <= 0 or length <= self.prompt_lookup_min:
            return _EMPTY
        # Candidates: earlier places where the last token occurred (a match of n >= 1 must end at one).
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        if len(ends) == 0:
            return _EMPTY
        n_max = self.prompt_lookup_max
        back = np.arange(n_max)
        # [C, n_max]: does token end - b equal token (length - 1) - b? Out-of-range (before the start) = no.
        index = ends[:, None] - back[None, :]
        suffix = tokens[length - 1 - back[: min(n_max, length)]]
        if len(suffix) < n_max:
            suffix = np.concatenate([suffix, np.full(n_max - len(suffix), -1, dtype=np.int64)])
        equal = (index >= 0) & (tokens[np.maximum(index, 0)] == suffix[None, :])
        match_len = np.cumprod(equal, axis=1).sum(axis=1)  # [C]: length of the common suffix, capped at n_max
        best = match_len.max()
        if best < self.prompt_lookup_min:
            return _EMPTY
        end = ends[np.flatnonzero(match_len == best)[-1]]  # the most recent occurrence of the longest match
        return tokens[end + 1: end + 1 + k].copy()

    def propose_batch(self, sequences: list[TokenIds[int]], max_tokens: list[int] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Proposals for several sequences, padded: int64 [S, k] (-1 past each row's proposal) and int64 [S]
        lengths; the layout the rejection sampler takes."""
        k = self.num_speculative_tokens
        drafts = np.full((len(sequences), k), -1, dtype=np.int64)
        lengths = np.zeros(len(sequences), dtype=np.int64)
        for row, tokens in enumerate(sequences):
            proposal = self.propose(tokens, None if max_tokens is None else max_tokens[row])
            drafts[row, : len(proposal)] = proposal
            lengths[row] = len(proposal)
        return drafts, lengths
