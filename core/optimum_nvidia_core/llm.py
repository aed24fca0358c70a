"""The facade: ``LLM`` turns prompts or chat messages into streamed or whole results.

An ``LLM`` is a light handle; the engine behind it (model, KV cache, engine thread) is shared per
(resolved model, options) inside the process, so two chat models on the same model share one in-flight batch.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import numbers
import os
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator, Sequence

from .config import EngineConfig
from .hub import DEFAULT_MODEL
from .outputs import Completion, RequestOutput
from .request_checks import prompt_list
from .request_stream import EngineError, RequestStream
from .sampling_params import SamplingParams
from .tool_stream import ToolCallStream

Prompt = str | list[int]

_registry: dict[str, Any] = {}  # options key -> EngineFrontend
_handles: dict[str, int] = {}  # options key -> live LLM handles; the engine stops with the last one
_registry_lock = threading.RLock()  # re-entrant: a handle's finalizer may run during a registry update


class LLM:
    """A LLaMA-family model served by the in-flight batched engine.

    >>> llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> llm.generate(["Hi"], SamplingParams(max_tokens=8, temperature=0))[0].text
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, use_fp8: bool = False, **engine_options: Any):
        self.config = _with_calibration_samples(EngineConfig(model=str(model), use_fp8=use_fp8, **engine_options))
        self._key = _registry_key(self.config)
        self._worker = _get_or_start_worker(self._key, self.config)
        with _registry_lock:
            _handles[self._key] = _handles.get(self._key, 0) + 1
        weakref.finalize(self, _release, self._key)

    # ---- properties ------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._live_worker().tokenizer

    @property
    def max_seq_len(self) -> int:
        return self._live_worker().info.max_seq_len

    @property
    def model_name(self) -> str:
        return self._live_worker().info.model_name

    @property
    def vocab_size(self) -> int:
        """Width of the model's logits (token ids are in [0, vocab_size))."""
        return self._live_worker().info.vocab_size

    @property
    def model_dir(self) -> Path:
        """Where the loaded model's config.json and tokenizer files are."""
        return Path(self._live_worker().info.model_dir)

    def stats(self) -> dict[str, int]:
        """Engine counters (steps, max sequences in one step, prefix-cache hits, preemptions, free KV blocks,
        running requests, ...)."""
        return self._live_worker().call("stats")

    def encode(self, text: str) -> list[int]:
        return self._live_worker().inputs.encode(text)

    # ---- text generation -------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> RequestStream:
        """Deltas of one request; iterate with ``for`` or ``async for``. Closing or dropping it aborts."""
        return self._submit(prompt, params or SamplingParams())

    async def astream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """The same stream, for ``async for``; never blocks the event loop (the prompt is tokenized and checked
        on a worker thread)."""
        stream = await asyncio.to_thread(self._submit, prompt, params or SamplingParams())
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.close()

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Whole results, one per prompt; all prompts run in one in-flight batch. An exception while waiting (a
        timeout signal, Ctrl-C) aborts every one of them."""
        prompts = prompt_list(prompts)
        params_list = _params_per_prompt(params, len(prompts))
        streams: list[RequestStream] = []
        try:
            for p, sp in zip(prompts, params_list):
                streams.append(self._submit(p, sp))
            return [collect(s) for s in streams]
        finally:
            for s in streams:
                s.close()

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
        # The chat template, tools and tokenization run on a worker thread, not on the caller's event loop.
        tool_stream = await asyncio.to_thread(self._chat_request, messages, params, tools, tool_choice,
                                              parallel_tool_calls)
        try:
            async for delta in tool_stream.source:
                for out in tool_stream.feed(delta):
                    yield out
        finally:
            tool_stream.source.close()

    def _chat_request(self, messages: list[dict], params: SamplingParams | None, tools: list[dict] | None,
                      tool_choice: str | None, parallel_tool_calls: bool = True) -> ToolCallStream:
        worker = self._live_worker()
        params = params or SamplingParams()
        prompt, params, plan = worker.inputs.prepare_chat(messages, params, tools, tool_choice, parallel_tool_calls)
        return ToolCallStream(self._submit(prompt, params), plan)

    # ---- tools -----------------------------------------------------------------------------------------
    def perplexity(self, text: str) -> float:
        """Perplexity of the model on ``text`` (lets users check FP8 quality on their own data)."""
        token_ids = self.encode(text)
        return self._live_worker().call("perplexity", token_ids)

    def save(self, engine_dir: str | Path) -> Path:
        """Write the engine (weights, scales, tokenizer, manifest) so ``LLM(engine_dir)`` loads it directly."""
        return self._live_worker().call("save", Path(engine_dir))

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
        token_ids = worker.inputs.check_prompt(prompt, params)
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


def _with_calibration_samples(config: EngineConfig) -> EngineConfig:
    """The config with its calibration dataset read into the samples a build uses (an iterator is read once,
    here, and the samples cross to the engine core's process as plain lists)."""
    if config.calibration_dataset is None:
        return config
    from .build.calibration import select_calibration_samples

    samples = select_calibration_samples(config.calibration_dataset, config.calibration_samples)
    return config.model_copy(update={"calibration_dataset": samples})


def _registry_key(config: EngineConfig) -> str:
    """Engines are shared by the content of their options, calibration data included (equal datasets share one
    engine; a new dataset never gets an old one)."""
    options = config.model_dump(exclude={"calibration_dataset"})
    options["source"] = _folder_stamp(config.model)
    if config.calibration_dataset is not None:
        from .build.calibration import calibration_hash

        options["calibration_dataset"] = calibration_hash(config.calibration_dataset, config.calibration_max_length)
    return json.dumps(options, sort_keys=True, default=str)


def _folder_stamp(model: str) -> list | None:
    """A local model folder's resolved path and the stat stamp of its files: a checkpoint saved over the same
    folder gets an engine of its own (the old engine keeps serving its live handles). Dot files are left out (an
    engine dir's verification stamp is rewritten by loading it). None for a hub id."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    files = []
    for path in sorted(folder.iterdir()):
        if not path.name.startswith(".") and path.is_file():
            s = path.stat()
            files.append([path.name, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino])
    return [str(folder.resolve()), files]


def _get_or_start_worker(key: str, config: EngineConfig) -> Any:
    from .frontend import EngineFrontend

    with _registry_lock:
        worker = _registry.get(key)
        if worker is None or not worker.alive:
            worker = EngineFrontend(config)
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


def _forget_parent_engines() -> None:
    """In a forked child: the parent's engines are the parent's (their sockets and threads did not come along).
    Drop them here; an LLM handle used in the child starts an engine of its own."""
    global _registry_lock
    _registry_lock = threading.RLock()  # another thread of the parent may have held it at the fork
    with _registry_lock:
        workers = list(_registry.values())
        _registry.clear()
    for worker in workers:
        worker.shutdown()  # in a child this only closes the child's copy of the socket


os.register_at_fork(after_in_child=_forget_parent_engines)


@atexit.register
def _shutdown_all() -> None:
    with _registry_lock:
        workers = list(_registry.values())
        _registry.clear()
    for worker in workers:
        worker.shutdown(timeout=2.0)
