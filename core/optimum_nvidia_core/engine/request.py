"""The engine core's book-keeping for one request: its n sequences and their grammar matchers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..sampling_params import SamplingParams
from .interface import EngineCoreOutput
from .sequence import Sequence


@dataclass
class Request:
    request_id: str
    params: SamplingParams
    seqs: list[Sequence]
    matchers: list[Any] = field(default_factory=list)  # guided.Matcher per sequence, when guided
    num_finished: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.seqs)

    def output(self, seq: Sequence, token: int, finish_reason: str | None,
               logprobs: dict[int, float] | None) -> EngineCoreOutput:
        if finish_reason is not None:
            self.num_finished += 1
        return EngineCoreOutput(self.request_id, seq.index, [token], finish_reason,
                                None if logprobs is None else [logprobs], seq.num_cached_tokens)

    def output_run(self, seq: Sequence, token_ids: list[int], finish_reason: str | None) -> EngineCoreOutput:
        """Several new tokens of one step (a verified speculative run)."""
        if finish_reason is not None:
            self.num_finished += 1
        return EngineCoreOutput(self.request_id, seq.index, token_ids, finish_reason, None, seq.num_cached_tokens)

    def error(self, message: str, bad_request: bool = False) -> EngineCoreOutput:
        return EngineCoreOutput(self.request_id, finish_reason="error", error=message, bad_request=bad_request)
