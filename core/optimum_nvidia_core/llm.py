"""The facade: ``LLM`` turns prompts or chat messages into streamed or whole results.

An ``LLM`` is a light handle; the engine behind it (model, KV cache, engine thread) is shared per
(resolved model, options) inside the process, so two chat models on the same model share one in-flight batch.
"""
from __future__ import annotations

import atexit
import json
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator, Sequence

from .config import EngineConfig
from .hub import DEFAULT_MODEL
from .outputs import Completion, RequestOutput
from .request_stream import EngineError, RequestStream
from .sampling_params import SamplingParams
from .tool_stream import ToolCallStream

Prompt = str | list[int]

_registry: dict[str, Any] = {}  # options key -> EngineWorker
_handles: dict[str, int] = {}  # options key -> live LLM handles; the engine stops with the last one
_registry_lock = threading.RLock()  # re-entrant: a handle's finalizer may run during a registry update


class LLM:
    """A LLaMA-family model served by the in-flight batched engine.

    >>> llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> llm.generate(["Hi"], SamplingParams(max_tokens=8, temperature=0))[0].text
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, use_fp8: bool = False, **engine_options: Any):
        self.config = EngineConfig(model=str(model), use_fp8=use_fp8, **engine_options)
        self._key = _registry_key(self.config)
        self._worker = _get_or_start_worker(self._key, self.config)
        with _registry_lock:
            _handles[self._key] = _handles.get(self._key, 0) + 1
        weakref.finalize(self, _release, self._key)

    # ---- properties ------------------------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        return self._live_worker().engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def stats(self) -> dict[str, int]:
        """Engine counters (steps, max sequences in one step, prefix-cache hits, preemptions, ...)."""
        return self.engine.stats()

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    # ---- text generation -------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> RequestStream:
        """Deltas of one request; iterate with ``for`` or ``async for``. Closing or dropping it aborts."""
        return self._submit(prompt, params or SamplingParams())

    def astream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """The same stream, for ``async for``; never blocks the event loop."""
        return self._submit(prompt, params or SamplingParams())

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Whole results, one per prompt; all prompts run in one in-flight batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = _params_per_prompt(params, len(prompts))
        streams = [self._submit(p, sp) for p, sp in zip(prompts, params_list)]
        return [collect(s) for s in streams]

    # ---- chat ------------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], params: SamplingParams | None = None, *, tools: list[dict] | None = None,
             tool_choice: str | None = None, parallel_tool_calls: bool = True) -> RequestOutput:
        """One chat turn through the model's chat template; ``tool_calls`` filled when the model calls tools
        (``choices[i].tool_calls`` for each of n completions). ``parallel_tool_calls=False``: a forced reply holds
        exactly one call."""
        return collect(self.chat_stream(messages, params, tools=tools, tool_choice=tool_choice,
                                        parallel_tool_calls=parallel_tool_calls))

    def chat_stream(self, messages: list[dict], params: SamplingParams | None = None, *,
                    tools: list[dict] | None = None, tool_choice: str | None = None,
                    parallel_tool_calls: bool = True) -> Iterator[RequestOutput]:
        tool_stream = self._chat_request(messages, params, tools, tool_choice, parallel_tool_calls)
        try:
            for delta in tool_stream.source:
                yield from tool_stream.feed(delta)
        finally:
            tool_stream.source.close()

    async def achat_stream(self, messages: list[dict], params: SamplingParams | None = None, *,
                           tools: list[dict] | None = None, tool_choice: str | None = None,
                           parallel_tool_calls: bool = True) -> AsyncIterator[RequestOutput]:
        tool_stream = self._chat_request(messages, params, tools, tool_choice, parallel_tool_calls)
        try:
            async for delta in tool_stream.source:
                for out in tool_stream.feed(delta):
                    yield out
        finally:
            tool_stream.source.close()

    def _chat_request(self, messages: list[dict], params: SamplingParams | None, tools: list[dict] | None,
                      tool_choice: str | None, parallel_tool_calls: bool = True) -> ToolCallStream:
        engine = self.engine
        params = params or SamplingParams()
        prompt, params, plan = engine.formatter.prepare(messages, params, tools=tools, tool_choice=tool_choice,
                                                        parallel_tool_calls=parallel_tool_calls)
        return ToolCallStream(self._submit(prompt, params), plan)

    # ---- tools -----------------------------------------------------------------------------------------
    def perplexity(self, text: str) -> float:
        """Perplexity of the model on ``text`` (lets users check FP8 quality on their own data)."""
        token_ids = self.encode(text)
        return self._live_worker().call(lambda engine: engine.perplexity(token_ids))

    def save(self, engine_dir: str | Path) -> Path:
        """Write the engine (weights, scales, tokenizer, manifest) so ``LLM(engine_dir)`` loads it directly."""
        return self._live_worker().call(lambda engine: engine.save(Path(engine_dir)))

    def shutdown(self) -> None:
        """Stop the shared engine (every LLM handle on it); a new ``LLM(...)`` starts a fresh one."""
        with _registry_lock:
            worker = _registry.pop(self._key, None)
        if worker is not None:
            worker.shutdown()

    # ---- internals -------------------------------------------------------------------------------------
    def _submit(self, prompt: Prompt, params: SamplingParams) -> RequestStream:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        worker = self._live_worker()
        token_ids = worker.engine.check_prompt(prompt, params)
        stream = worker.submit(uuid.uuid4().hex, token_ids, params)
        stream.keepalive = self
        return stream

    def _live_worker(self) -> Any:
        if not self._worker.alive:  # the engine died or was shut down: the next call starts a fresh one
            self._worker = _get_or_start_worker(self._key, self.config)
        return self._worker


def get_llm(model: str = DEFAULT_MODEL, **options: Any) -> LLM:
    """The shared LLM for ``model`` and ``options`` (alias of ``LLM(...)``, which already shares engines)."""
    return LLM(model, **options)


def collect(deltas: Iterable[RequestOutput]) -> RequestOutput:
    """Fold a stream of deltas into one whole result (all n completions in ``choices``)."""
    choices: dict[int, Completion] = {}
    last: RequestOutput | None = None
    for delta in deltas:
        c = choices.setdefault(delta.index, Completion(index=delta.index, logprobs=[] if delta.logprobs else None))
        c.text += delta.text
        c.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            c.logprobs = (c.logprobs or []) + delta.logprobs
        if delta.reasoning:
            c.reasoning = (c.reasoning or "") + delta.reasoning
        c.tool_calls.extend(delta.tool_calls)
        if delta.finish_reason is not None:
            c.finish_reason = delta.finish_reason
        last = delta
    if last is None:
        raise EngineError("the request ended without output (it was aborted)")
    ordered = [choices[i] for i in sorted(choices)]
    first = ordered[0]
    return RequestOutput(
        request_id=last.request_id, text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason,
        finished=True, usage=last.usage, metrics=last.metrics, logprobs=first.logprobs, choices=ordered,
        tool_calls=first.tool_calls, error=last.error, reasoning=first.reasoning,
    )


def _params_per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError(f"params must be a SamplingParams or a list of them, got {type(params).__name__}; "
                        "build one with SamplingParams(max_tokens=..., temperature=...)")
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt")
    return params


def _registry_key(config: EngineConfig) -> str:
    options = config.model_dump(exclude={"calibration_dataset"})
    calib = config.calibration_dataset
    options["calibration_dataset"] = None if calib is None else f"{type(calib).__name__}:{id(calib)}"
    return json.dumps(options, sort_keys=True, default=str)


def _get_or_start_worker(key: str, config: EngineConfig) -> Any:
    from .engine.llm_engine import LLMEngine
    from .engine.worker import EngineWorker

    with _registry_lock:
        worker = _registry.get(key)
        if worker is None or not worker.alive:
            worker = EngineWorker(LLMEngine(config))
            _registry[key] = worker
        return worker


def _release(key: str) -> None:
    """The last handle on an engine is gone: stop its thread and free its memory. This may run inside the garbage
    collector on any thread; the join is bounded, and skipped on the engine's own thread."""
    with _registry_lock:
        count = _handles.get(key, 0) - 1
        if count > 0:
            _handles[key] = count
            return
        _handles.pop(key, None)
        worker = _registry.pop(key, None)
    if worker is not None:
        worker.shutdown(timeout=5.0)


@atexit.register
def _shutdown_all() -> None:
    with _registry_lock:
        workers = list(_registry.values())
        _registry.clear()
    for worker in workers:
        worker.shutdown(timeout=2.0)
