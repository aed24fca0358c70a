"""Output processing: the engine core's token ids become each request's streamed text deltas.

Runs on the caller's side, off the core's critical path: incremental detokenization, stop strings (a hit ends that
completion here and is sent to the core as an abort, so it stops within a step), usage and timing, and delivery
into each request's ``RequestStream``. Streams are held weakly: a stream nobody reads any more (dropped, or left
behind by a ``break``) aborts its request instead of generating on to max_tokens.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from .detokenizer import IncrementalDetokenizer
from .engine.interface import EngineCoreOutput
from .outputs import Metrics, RequestOutput, Usage
from .request_stream import RequestFailed, RequestStream, Wakeups
from .sampling_params import SamplingParams

Abort = tuple[str, int | None]  # (request_id, completion index or None for the whole request)


@dataclass
class RequestState:
    request_id: str
    params: SamplingParams
    num_prompt_tokens: int
    stream: weakref.ref
    detokenizers: list[IncrementalDetokenizer]
    hidden_ids: frozenset[int]  # end-of-sequence and stop ids: they end a completion and are never shown
    finished: list[bool] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    metrics: Metrics = field(default_factory=lambda: Metrics(arrival_time=time.perf_counter()))

    @property
    def done(self) -> bool:
        return all(self.finished)

    def delta(self, out: EngineCoreOutput, now: float) -> tuple[RequestOutput | None, bool]:
        """The text delta of one core output; and whether a stop string ended the completion here."""
        i = out.index
        if self.finished[i]:
            return None, False  # a stop string ended it; tokens the core made meanwhile are dropped
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        if self.completion_tokens == 0 or not self.cached_tokens[i]:
            self.cached_tokens[i] = out.num_cached_tokens
        finish, ids = out.finish_reason, out.token_ids
        shown = ids[:-1] if finish == "stop" and ids and ids[-1] in self.hidden_ids else ids
        detok = self.detokenizers[i]
        text, stop_hit, num_used = _detokenize(detok, shown)
        if stop_hit is not None and num_used < len(ids):  # a stop string inside a run: its later tokens never were
            ids, finish = ids[:num_used], None
        self.completion_tokens += len(ids)
        stopped_here = stop_hit is not None and finish is None
        if stop_hit is not None:
            finish = "stop"
        elif finish is not None:
            text += detok.flush()
        if finish is not None:
            self.finished[i] = True
        delta = RequestOutput(request_id=self.request_id, text=text, token_ids=list(ids), index=i,
                              finish_reason=finish, logprobs=out.logprobs)
        if self.done:
            self.metrics.finished_time = now
            delta.finished = True
            delta.usage = Usage(prompt_tokens=self.num_prompt_tokens, completion_tokens=self.completion_tokens,
                                cached_tokens=min(self.cached_tokens))
            delta.metrics = self.metrics
        return delta, stopped_here


def _detokenize(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[str, str | None, int]:
    """(text, stop string hit or None, tokens used). Several ids at once (a speculative run) go one at a time
    while stop strings are active, so a stop string ends the completion at the token plain decoding ends it."""
    if not ids:
        return "", None, 0
    if len(ids) == 1 or not detok.stop:
        return *detok.step(ids), len(ids)
    text = ""
    for used, token in enumerate(ids, 1):
        piece, stop_hit = detok.step([token])
        text += piece
        if stop_hit is not None:
            return text, stop_hit, used
    return text, None, len(ids)


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._requests: dict[str, RequestState] = {}
        self._lock = threading.Lock()  # add/remove come from callers' threads, process from the reader's

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            stream: RequestStream) -> None:
        n = params.n
        state = RequestState(
            request_id, params, len(prompt_token_ids), weakref.ref(stream),
            [IncrementalDetokenizer(self.tokenizer, params) for _ in range(n)],
            self.eos_token_ids | frozenset(params.stop_token_ids), [False] * n, [0] * n)
        with self._lock:
            self._requests[request_id] = state

    def remove(self, request_id: str) -> bool:
        with self._lock:
            return self._requests.pop(request_id, None) is not None

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def process(self, outputs: list[EngineCoreOutput]) -> list[Abort]:
        """Deliver one step's outputs; returns what the core must stop (stop strings hit, streams dropped)."""
        aborts: list[Abort] = []
        wakeups = Wakeups()  # one wake-up per event loop for the whole step
        now = time.perf_counter()
        with self._lock:
            for out in outputs:
                state = self._requests.get(out.request_id)
                if state is None:
                    continue  # aborted or finished meanwhile
                stream = state.stream()
                if stream is None:  # nobody reads it any more
                    del self._requests[out.request_id]
                    aborts.append((out.request_id, None))
                    continue
                if out.error is not None:
                    del self._requests[out.request_id]
                    stream.put(RequestFailed(out.error, out.bad_request), wakeups)
                    continue
                delta, stopped_here = state.delta(out, now)
                if stopped_here:
                    aborts.append((out.request_id, out.index))
                if state.done:
                    del self._requests[out.request_id]
                if delta is not None:
                    stream.put(delta, wakeups)
        wakeups.send()
        return aborts

    def fail(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            state = self._requests.pop(request_id, None)
        stream = state.stream() if state is not None else None
        if stream is not None:
            stream.put(error)

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            states = list(self._requests.values())
            self._requests.clear()
        for state in states:
            stream = state.stream()
            if stream is not None:
                stream.put(error)
