"""The one thread that owns the engine (and the GPU).

Callers on any thread or event loop submit requests and read their own ``RequestStream``; the worker drains its
command queue between steps, so new requests join the running batch at the next step (in-flight batching).
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from ..outputs import RequestOutput
from ..request_stream import EngineError, RequestStream, Wakeups
from ..sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_IDLE_POLL_S = 0.5


class EngineWorker:
    def __init__(self, engine: Any, name: str = "optimum-nvidia-engine"):
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self.error: BaseException | None = None  # set when the thread died; the worker is then unusable
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and not self._stopping and self._thread.is_alive()

    # ---- caller side -------------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        self._check_alive()
        stream = RequestStream(request_id, self.abort)
        self._commands.put(("add", request_id, prompt_token_ids, params, stream))
        if not self.alive:  # died between the check and the put: nobody will drain the queue
            stream.put(EngineError("the engine stopped; create the LLM again"))
        return stream

    def abort(self, request_id: str) -> None:
        if self.alive:
            self._commands.put(("abort", request_id))

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between two steps and return its result."""
        self._check_alive()
        future: Future = Future()
        self._commands.put(("call", fn, future))
        return future.result()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._stopping = True
            self._commands.put(("stop",))
            if timeout > 0 and threading.current_thread() is not self._thread:
                self._thread.join(timeout)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineError(f"the engine thread stopped after an error: {self.error!r}; create the LLM again")
        if self._stopping or not self._thread.is_alive():
            raise EngineError("the engine was shut down; create the LLM again")

    # ---- engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self._stopping:
                    self._dispatch(self.engine.step())
        except BaseException as exc:  # noqa: BLE001 - the thread must report any death to its callers
            logger.exception("engine thread died")
            self.error = exc
        finally:
            self._fail_everything()

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_token_ids, params, stream = command
            try:
                self.engine.add_request(request_id, prompt_token_ids, params)
            except Exception as exc:  # a bad request fails alone
                stream.put(exc)
                return
            self._streams[request_id] = stream
        elif kind == "abort":
            if self._streams.pop(command[1], None) is not None:
                self.engine.abort_request(command[1])
        elif kind == "call":
            _, fn, future = command
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)
        elif kind == "stop":
            self._stopping = True

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        wakeups = Wakeups()  # one wake-up per event loop for the whole step
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if out.error is not None:
                del self._streams[out.request_id]
                stream.put(EngineError(out.error), wakeups)
            else:
                if out.finished:
                    del self._streams[out.request_id]
                stream.put(out, wakeups)
        wakeups.send()

    def _fail_everything(self) -> None:
        reason = EngineError(
            f"the engine stopped ({self.error!r}); create the LLM again" if self.error else "the engine was shut down"
        )
        for stream in self._streams.values():
            stream.put(reason)
        self._streams.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                command[4].put(reason)
            elif command[0] == "call":
                command[2].set_exception(reason)
