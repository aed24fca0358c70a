"""One request's output channel: fed by the engine thread, read as a sync or an async iterator.

The engine thread calls ``put`` (thread-safe). A sync reader blocks on a ``queue.Queue``; an async reader awaits an
``asyncio.Future`` that the engine thread resolves through ``loop.call_soon_threadsafe`` — no thread per request and
the event loop never blocks. Dropping, closing or cancelling the reader aborts the request.
"""
from __future__ import annotations

import asyncio
import collections
import queue
import threading
from typing import Callable

from .outputs import RequestOutput


class EngineError(RuntimeError):
    """The request failed inside the engine (its message says why); other requests keep running."""


class RequestStream:
    def __init__(self, request_id: str, abort: Callable[[str], None]):
        self.request_id = request_id
        self._abort = abort
        self._lock = threading.Lock()
        self._items: collections.deque[RequestOutput | BaseException] = collections.deque()
        self._sync_wakeup: queue.Queue[None] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future | None = None
        self._done = False  # the reader has seen the last item
        self._closed = False

    # ---- engine side -------------------------------------------------------------------------------------
    def put(self, item: RequestOutput | BaseException) -> None:
        with self._lock:
            self._items.append(item)
            loop, waiter = self._loop, self._waiter
        self._sync_wakeup.put(None)
        if loop is not None and waiter is not None:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the reader's loop is closed: nobody is listening any more
                pass

    # ---- reader side -------------------------------------------------------------------------------------
    def _pop(self) -> RequestOutput | BaseException | None:
        with self._lock:
            return self._items.popleft() if self._items else None

    def _deliver(self, item: RequestOutput | BaseException) -> RequestOutput:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> RequestOutput:
        if self._done or self._closed:
            raise StopIteration
        try:
            while (item := self._pop()) is None:
                self._sync_wakeup.get()
        except BaseException:  # KeyboardInterrupt while waiting: abort cleanly
            self.close()
            raise
        return self._deliver(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done or self._closed:
            raise StopAsyncIteration
        try:
            while (item := self._pop()) is None:
                await self._wait_async()
        except BaseException:  # cancelled task: abort the request
            self.close()
            raise
        return self._deliver(item)

    async def _wait_async(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._items:
                return
            self._loop, self._waiter = loop, loop.create_future()
            waiter = self._waiter
        try:
            await waiter
        finally:
            with self._lock:
                self._waiter = None

    def close(self) -> None:
        """Stop reading; aborts the request if it has not finished."""
        if not self._closed:
            self._closed = True
            if not self._done:
                self._abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
