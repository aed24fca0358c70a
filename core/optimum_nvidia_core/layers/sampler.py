"""Next-token sampling for a whole batch at once, on the logits' device.

Per row (one sequence): penalties (repetition over prompt + output, presence / frequency over the output, as in
vLLM) -> EOS and stop ids banned before min_tokens -> grammar mask -> greedy argmax, or temperature -> top-k ->
top-p -> min-p -> inverse-CDF draw. Each row's uniform number is a pure function of (sequence seed, position)
computed with integer hashing, so a seeded sequence draws the same token whatever batch it shares, with no
per-row generator and no host sync (top log-probabilities stay on the device, packed for the caller's one copy).
(One uniform per row, not Gumbel noise per vocabulary entry: hashing [S, V] integers cost more than the model
step on the CPU.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .token_bitmask import TokenBitmask, apply_token_bitmask

if TYPE_CHECKING:
    from optimum_nvidia_core.engine.sequence import Sequence

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors ([S] each unless noted), gathered once per step from the rows of a
    SamplingTable. When every row is greedy with no penalty, ban or logprobs (the common serving case), no tensor
    is built at all: argmax only."""

    temperature: torch.Tensor | None = None  # float32, 1.0 on greedy rows
    is_greedy: torch.Tensor | None = None  # bool
    top_k: torch.Tensor | None = None  # int64, 0 = off
    top_p: torch.Tensor | None = None  # float32, 1.0 = off
    min_p: torch.Tensor | None = None  # float32, 0.0 = off
    seeds: torch.Tensor | None = None  # int64
    positions: torch.Tensor | None = None  # int64: position of the token being sampled (= tokens so far)
    repetition_penalty: torch.Tensor | None = None  # float32
    presence_penalty: torch.Tensor | None = None  # float32
    frequency_penalty: torch.Tensor | None = None  # float32
    # Padded with -1: [S, L] token ids. Only built when some row needs them (else None).
    prompt_token_ids: torch.Tensor | None = None
    output_token_ids: torch.Tensor | None = None
    banned_token_ids: torch.Tensor | None = None  # EOS/stop ids of rows still below min_tokens
    token_bitmask: TokenBitmask | None = None  # grammar constraint of the guided rows, packed bits
    top_k_top_p_rows: torch.Tensor | None = None  # int64 [R]: sampled rows with top-k or top-p (they need a sort)
    # Host-side flags, so unused stages cost nothing.
    all_greedy: bool = True
    any_min_p: bool = False
    num_logprobs: tuple[int | None, ...] = ()  # per row: top-N logprobs asked for, or None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [S], on the logits' device
    top_logprobs: torch.Tensor | None = None  # float64 [S, 2N + 2] on the device (see _top_logprobs), or None
    num_logprobs: tuple[int | None, ...] = ()

    @property
    def logprobs(self) -> list[dict[int, float] | None] | None:
        """Per row: {token: logprob} for the top-N and the sampled token. Reads the device (a sync)."""
        if self.top_logprobs is None:
            return None
        return unpack_top_logprobs(self.top_logprobs.tolist(), self.num_logprobs)


class Sampler:
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: float [S, V] (not modified). Returns the sampled token of each row."""
        logits = apply_penalties(logits.float(), batch)
        logits = apply_bans(logits, batch)
        greedy_tokens = logits.argmax(dim=-1)
        if batch.all_greedy:
            tokens = greedy_tokens
        else:
            scaled = logits / batch.temperature[:, None]
            rows = batch.top_k_top_p_rows
            if rows is not None:  # sorting the vocabulary is costly on the CPU: only the rows that need it
                truncated = apply_top_k_top_p(scaled[rows], batch.top_k[rows], batch.top_p[rows])
                scaled = scaled.index_copy(0, rows, truncated)
            if batch.any_min_p:
                scaled = apply_min_p(scaled, batch.min_p)
            drawn = draw_from(scaled.softmax(dim=-1), seeded_uniform(batch.seeds, batch.positions))
            tokens = torch.where(batch.is_greedy, greedy_tokens, drawn)
        top = None
        if any(n is not None for n in batch.num_logprobs):
            top = _top_logprobs(logits, tokens, batch.num_logprobs)
        return SamplerOutput(tokens, top, batch.num_logprobs)


# ---- stages (each returns a new tensor; exposed for tests) -----------------------------------------------------
def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (divide positive / multiply negative logits of any token seen in prompt or output), then
    frequency (minus count in output) and presence (minus 1 if in output)."""
    if batch.output_token_ids is None:
        return logits
    vocab = logits.shape[1]
    output_counts = _token_counts(batch.output_token_ids, vocab)  # [S, V] float
    if batch.prompt_token_ids is not None:
        seen = (_token_counts(batch.prompt_token_ids, vocab) + output_counts) > 0
        penalty = batch.repetition_penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    logits = logits - batch.frequency_penalty[:, None] * output_counts
    return logits - batch.presence_penalty[:, None] * (output_counts > 0).float()


def apply_bans(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """-inf for EOS/stop ids before min_tokens, and for tokens the grammar disallows."""
    if batch.banned_token_ids is not None:
        logits = logits.masked_fill(_token_counts(batch.banned_token_ids, logits.shape[1]) > 0, float("-inf"))
    if batch.token_bitmask is not None:
        logits = apply_token_bitmask(logits, batch.token_bitmask)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k best tokens (0 = all), then the smallest best-first set whose probability reaches
    top_p (a token stays if the mass strictly before it is < top_p). Others become -inf."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's best token's probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def seeded_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uniform number in (0, 1) per row (float64 [S]) that depends only on (seed, position): counter-based."""
    key = _mix32(_mix32(_mix32(seeds >> 32) ^ (seeds & _MASK32)) ^ (positions & _MASK32))
    key = _mix32(key + 0x9E3779B9)  # one more round: positions that differ in one bit still decorrelate
    return (key.double() + 0.5) * (1.0 / (1 << 32))


def draw_from(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative probability exceeds uniform * total. probs [S, V],
    uniform [S] -> int64 [S]. Zero-probability tokens are never drawn (the CDF does not rise there)."""
    cdf = probs.double().cumsum(dim=-1)
    target = uniform[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A two-round 32-bit integer hash (from C. Wellons' hash-prospector) in int64 arithmetic: inputs below 2^32
    and multipliers below 2^31 keep every product below 2^63, so nothing overflows on any device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs per row: [S, L] ids padded with -1 -> float [S, V]."""
    index = token_ids.masked_fill(token_ids < 0, vocab_size)  # padding lands in a spare column
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, device=token_ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts[:, :vocab_size]


def padded_ids(rows: list[list[int]], device: torch.device | str) -> torch.Tensor:
    """Token-id lists as int64 [S, L], padded with -1."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64).to(device, non_blocking=True)


def _top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_logprobs) -> torch.Tensor:
    """Log-probabilities of the distribution after penalties and masks, before temperature and truncation, packed
    per row as float64 [S, 2N + 2]: N top ids, their N logprobs, the sampled id, its logprob (N = the most asked
    for). Stays on the device: the caller copies it with the tokens."""
    logprobs = logits.log_softmax(dim=-1)
    top_n = max(n or 0 for n in num_logprobs)
    values, ids = logprobs.topk(top_n, dim=-1) if top_n else (logprobs[:, :0], tokens[:, None][:, :0])
    sampled = logprobs.gather(1, tokens[:, None])
    return torch.cat([ids.double(), values.double(), tokens[:, None].double(), sampled.double()], dim=1)


def unpack_top_logprobs(rows: list[list[float]], num_logprobs, first: int = 0) -> list[dict[int, float] | None]:
    """_top_logprobs' packed rows (host lists, read from column ``first`` on) -> per row {token: logprob}."""
    top_n = max((n or 0 for n in num_logprobs), default=0)
    result: list[dict[int, float] | None] = []
    for row, n in zip(rows, num_logprobs):
        if n is None:
            result.append(None)
            continue
        row = row[first:]
        top = {int(t): v for t, v in zip(row[:n], row[top_n : top_n + n])}
        top[int(row[-2])] = row[-1]
        result.append(top)
    return result
