"""The server's engine when it runs in the server's own process: loading, readiness and restarts.

The ``LLM`` is built on a worker thread after the server starts listening, so ``/health`` can answer (503) while
the weights load. An ``EngineError`` that means the engine is down (not one request failing) triggers a restart
on a worker thread; until it is back, requests get 503 with ``Retry-After`` instead of blocking the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from ..request_stream import EngineError, RequestFailed
from .errors import APIError
from .metrics import RequestTimer
from .protocol import ChatCompletionRequest, CompletionRequest
from .serving import OpenAIServing

logger = logging.getLogger(__name__)


class LocalEngine:
    def __init__(self, model: str, *, served_model_name: str | None = None, **engine_options: Any):
        self.model = model
        self.engine_options = engine_options
        self.model_names = [served_model_name or model]
        self.state = "starting"  # starting -> ready <-> restarting; failed; stopped
        self.failure: str | None = None
        self.llm: Any = None
        self.serving: OpenAIServing | None = None
        self._load_task: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._load_task = asyncio.ensure_future(self._load())

    async def wait_ready(self) -> None:
        if self._load_task is not None:
            await self._load_task
        if self.state != "ready":
            raise RuntimeError(f"the engine did not start: {self.failure}")

    async def _load(self) -> None:
        from ..llm import LLM

        try:
            self.llm = await asyncio.to_thread(LLM, self.model, **self.engine_options)
        except Exception as exc:  # noqa: BLE001 - reported by /health and every request
            logger.exception("engine failed to start")
            self.state, self.failure = "failed", f"{type(exc).__name__}: {exc}"
            return
        if self.llm.model_name not in self.model_names:
            self.model_names.append(self.llm.model_name)
        self.serving = OpenAIServing(self.llm, self.model_names[0])
        self.state = "ready"

    async def restart(self) -> None:
        """Stop the engine and bring up a fresh one (requests meanwhile get 503)."""
        if self.state != "ready":
            return
        self.state = "restarting"
        await asyncio.to_thread(self.llm.shutdown)
        await self._bring_up()

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
        self.state = "stopped"

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        reason = {"starting": "the model is still loading", "restarting": "the engine is restarting",
                  "stopped": "the server is shutting down"}.get(self.state, f"the engine failed: {self.failure}")
        raise APIError(503, f"{reason}; retry shortly", code="engine_unavailable")

    async def replica_stats(self) -> dict[str, dict[str, int]]:
        return {"local": await asyncio.to_thread(self.llm.stats)} if self.state == "ready" else {}

    # ---- requests --------------------------------------------------------------------------------------
    def chat(self, req: ChatCompletionRequest, timer: RequestTimer | None = None) -> AsyncIterator[dict]:
        self.check_ready()
        return self._guard(self.serving.chat(req, timer))  # type: ignore[union-attr]

    def completions(self, req: CompletionRequest, timer: RequestTimer | None = None) -> AsyncIterator[dict]:
        self.check_ready()
        return self._guard(self.serving.completions(req, timer))  # type: ignore[union-attr]

    async def _guard(self, items: AsyncIterator[dict]) -> AsyncIterator[dict]:
        try:
            async with contextlib.aclosing(items):
                async for item in items:
                    yield item
        except RequestFailed:
            raise  # one request failed; the engine is fine (from_exception gives its status)
        except EngineError as exc:
            logger.warning("engine error: %s", exc)
            asyncio.ensure_future(self._recover())
            raise APIError(503, f"the engine failed ({exc}); retry shortly", code="engine_unavailable") from None

    async def _recover(self) -> None:
        if self.state == "ready":
            self.state = "restarting"
            await self._bring_up()

    async def _bring_up(self) -> None:
        """Use the engine on a worker thread: the facade restarts a dead engine on its next use (seconds); a live
        one answers at once."""
        try:
            await asyncio.to_thread(self.llm.stats)
            self.state = "ready"
        except Exception as exc:  # noqa: BLE001
            logger.exception("engine restart failed")
            self.state, self.failure = "failed", f"{type(exc).__name__}: {exc}"
