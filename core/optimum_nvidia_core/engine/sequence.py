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
        # Asynchronous scheduling: tokens sampled by a launched step whose ids are still on the device. They count
        # in num_tokens (the next step computes them from the device copy) but are not in token_ids yet.
        self.num_placeholders = 0
        self.num_registered_blocks = 0  # leading full blocks of block_table registered in the prefix cache
        self.row: int | None = None  # the model runner's persistent-batch row while it holds one
        max_tokens = params.max_tokens if params.max_tokens is not None else 1 << 62
        self.max_num_tokens = self.num_prompt_tokens + max_tokens  # where "length" ends it (before max_seq_len)
        # The next step's inputs need this sequence's newest token on the host (penalties over the output, an
        # output grammar): it is never scheduled while a placeholder is outstanding.
        self.needs_host_tokens = bool(params.repetition_penalty != 1.0 or params.presence_penalty
                                      or params.frequency_penalty or params.guided_json is not None)

    # -- token views --------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Tokens so far, placeholders included."""
        return len(self.token_ids) + self.num_placeholders

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, placeholders included."""
        return len(self.token_ids) + self.num_placeholders - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model: the rest of the prompt, or the last sampled token."""
        return len(self.token_ids) + self.num_placeholders - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_uncomputed_tokens > 1

    def reached_length(self, max_seq_len: int | None) -> bool:
        """Whether max_tokens or max_seq_len ends it once its placeholders resolve (no more steps needed)."""
        total = self.num_tokens
        return total >= self.max_num_tokens or (max_seq_len is not None and total >= max_seq_len)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def resolve_placeholder(self, token_id: int) -> None:
        """The oldest in-flight token reached the host."""
        self.num_placeholders -= 1
        self.token_ids.append(token_id)

    # -- token-level stop conditions ----------------------------------------------------------------------------
    def check_token_stop(self, eos_token_ids: set[int] | frozenset[int], max_seq_len: int | None = None) -> str | None:
        """Finish reason after the last appended token, from token ids and lengths only (stop strings are the
        detokenizer's job): "stop" for EOS / a stop token id, "length" at max_tokens or max_seq_len, else None."""
        params = self.params
        num_output = len(self.token_ids) - self.num_prompt_tokens
        if num_output == 0:
            return None
        last = self.token_ids[-1]
        if num_output >= params.min_tokens:
            if last in params.stop_token_ids:
                return "stop"
            if not params.ignore_eos and last in eos_token_ids:
                return "stop"
        num_tokens = len(self.token_ids)  # known tokens only: an in-flight token has not happened yet
        if num_tokens >= self.max_num_tokens:
            return "length"
        if max_seq_len is not None and num_tokens >= max_seq_len:
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
