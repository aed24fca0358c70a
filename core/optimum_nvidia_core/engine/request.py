"""Book-keeping for one request: its n sequences, their detokenizers and grammar matchers, usage and timing."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..outputs import Metrics, RequestOutput, Usage
from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .sequence import Sequence


@dataclass
class Request:
    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    matchers: list[Any] = field(default_factory=list)  # guided.Matcher per sequence, when guided
    metrics: Metrics = field(default_factory=lambda: Metrics(arrival_time=time.perf_counter()))
    num_finished: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.seqs)

    def delta(self, seq: Sequence, text: str, token_ids: list[int], finish_reason: str | None,
              logprobs: dict[int, float] | None = None) -> RequestOutput:
        """One streamed delta; the request's last one also carries usage and metrics."""
        out = RequestOutput(request_id=self.request_id, text=text, token_ids=token_ids, index=seq.index,
                            finish_reason=finish_reason, logprobs=[logprobs] if logprobs is not None else None)
        if self.finished:
            self.metrics.finished_time = time.perf_counter()
            out.finished = True
            out.usage = Usage(prompt_tokens=len(self.prompt_token_ids), completion_tokens=self.completion_tokens,
                              cached_tokens=min(s.num_cached_tokens for s in self.seqs))
            out.metrics = self.metrics
        return out

    def error(self, message: str) -> RequestOutput:
        return RequestOutput(request_id=self.request_id, finished=True, finish_reason="error", error=message)
