"""One completion being generated: its tokens, how many of them have KV in the cache, and its KV blocks.

A request with ``n > 1`` becomes n Sequences sharing the prompt (``index`` tells them apart); their prompt blocks
are shared through the block manager's prefix cache. Imports no torch, so the scheduler's tests stay fast.
"""
from __future__ import annotations

import enum
import itertools
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic model; only needed for annotations
    from optimum_nvidia_core.sampling_params import SamplingParams

_SEED_LIMIT = 2**63
_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed; holds no KV blocks
    RUNNING = "running"  # holds KV blocks; prefilling in chunks or decoding
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: "SamplingParams",
        index: int = 0,
        seed: int | None = None,
    ):
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r} has an empty prompt; pass at least one token")
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chain hash of each full block; filled lazily by the block manager
        self.status = SequenceStatus.WAITING
        self.num_preemptions = 0
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.error: str | None = None
        self.seed = seed if seed is not None else _derive_seed(params.seed, index)
        self.sampling_row = None  # the sampler's RowParams, derived once from params on first use

    # -- token views --------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model: the rest of the prompt, or the last sampled token."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    # -- token-level stop conditions ----------------------------------------------------------------------------
    def check_token_stop(self, eos_token_ids: set[int] | frozenset[int], max_seq_len: int | None = None) -> str | None:
        """Finish reason after the last appended token, from token ids and lengths only (stop strings are the
        detokenizer's job): "stop" for EOS / a stop token id, "length" at max_tokens or max_seq_len, else None."""
        params = self.params
        if self.num_output_tokens == 0:
            return None
        last = self.token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if last in params.stop_token_ids:
                return "stop"
            if not params.ignore_eos and last in eos_token_ids:
                return "stop"
        if params.max_tokens is not None and self.num_output_tokens >= params.max_tokens:
            return "length"
        if max_seq_len is not None and self.num_tokens >= max_seq_len:
            return "length"
        return None

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, index={self.index}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, status={self.status.value})"
        )


def _derive_seed(request_seed: int | None, index: int) -> int:
    """A fixed request seed gives each of the n completions its own, reproducible seed; no seed draws one."""
    if request_seed is None:
        return random.getrandbits(63)
    # Golden-ratio stride keeps seeds of neighbouring indices far apart (index 0 keeps the request's seed).
    return (request_seed + index * 0x9E3779B97F4A7C15) % _SEED_LIMIT
