"""One engine as the application's process sees it: input processing, the engine core behind its client, and
output processing.

Requests flow one way: ``submit`` (checked token ids) -> the core (its own process by default, see
``engine.core_client``) -> ``OutputProcessor`` on the client's reader thread -> each request's ``RequestStream``.
A core that dies fails every waiting caller at once; ``alive`` turns False and the next ``LLM`` call starts a new
one. In a forked child the parent's engine is unusable (its socket belongs to the parent): ``alive`` is False
there too, so the child starts an engine of its own.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from concurrent.futures import Future
from typing import Any

from .config import EngineConfig
from .engine.interface import EngineCoreRequest
from .input_processor import InputProcessor
from .output_processor import OutputProcessor
from .request_stream import EngineError, RequestStream
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineFrontend:
    def __init__(self, config: EngineConfig):
        from .engine.core_client import ProcessCoreClient, ThreadCoreClient

        self._pid = os.getpid()
        self.error: EngineError | None = None  # set when the core died
        self._stopping = False
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()
        self.outputs: OutputProcessor | None = None
        client_type = ProcessCoreClient if config.engine_process else ThreadCoreClient
        self.client = client_type(config, self._on_message)
        self.info = self.client.info
        core = getattr(self.client, "core", None)  # on a thread of this process: the tokenizer the core loaded
        self.tokenizer = core.loaded.tokenizer if core is not None else _load_tokenizer(self.info.model_dir)
        self.inputs = InputProcessor(self.tokenizer, self.info)
        self.outputs = OutputProcessor(self.tokenizer, self.info.eos_token_ids)

    @property
    def alive(self) -> bool:
        return (self.error is None and not self._stopping and self._pid == os.getpid() and self.client.alive)

    # ---- caller side -------------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        self._check_alive()
        stream = RequestStream(request_id, self.abort)
        self.outputs.add(request_id, prompt_token_ids, params, stream)
        try:
            self.client.send(("add", EngineCoreRequest(request_id, prompt_token_ids, params)))
        except OSError:  # the core died between the check and the send
            self.outputs.remove(request_id)
            raise EngineError("the engine stopped; create the LLM again") from None
        return stream

    def abort(self, request_id: str) -> None:
        if self.outputs.remove(request_id) and self.alive:
            try:
                self.client.send(("abort", [(request_id, None)]))
            except OSError:
                pass

    def call(self, method: str, *args: Any) -> Any:
        """Run ``core.<method>(*args)`` on the engine core between two steps and return its result."""
        self._check_alive()
        future: Future = Future()
        with self._lock:
            call_id = next(self._call_ids)
            self._calls[call_id] = future
        self.client.send(("call", call_id, method, args))
        return future.result()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._pid != os.getpid():
            self.client.forget()
            return
        self._stopping = True
        self.client.shutdown(timeout)
        self._fail_everything(EngineError("the engine was shut down"))

    def _check_alive(self) -> None:
        if self.error is not None:
            raise self.error
        if not self.alive:
            raise EngineError("the engine was shut down; create the LLM again")

    # ---- the client's reader thread ----------------------------------------------------------------------
    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            aborts = self.outputs.process(message[1])
            if aborts and self.alive:
                self.client.send(("abort", aborts))
        elif kind == "rejected":
            self.outputs.fail(message[1], message[2])
        elif kind == "result":
            _, call_id, ok, value = message
            with self._lock:
                future = self._calls.pop(call_id, None)
            if future is not None:
                future.set_result(value) if ok else future.set_exception(value)
        elif kind == "died":
            logger.error("engine core died: %s", message[1])
            self.error = EngineError(f"{message[1]}; create the LLM again")
            self._fail_everything(self.error)

    def _fail_everything(self, error: EngineError) -> None:
        if self.outputs is not None:
            self.outputs.fail_all(error)
        with self._lock:
            calls = list(self._calls.values())
            self._calls.clear()
        for future in calls:
            if not future.done():
                future.set_exception(error)


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
