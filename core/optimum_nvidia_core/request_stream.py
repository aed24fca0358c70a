"""One request's output channel: fed by the engine thread, read as a sync or an async iterator.

The engine thread calls ``put`` (thread-safe). A sync reader waits on a condition variable; an async reader awaits
an ``asyncio.Future`` that the engine thread resolves through ``loop.call_soon_threadsafe`` — no thread per request
and the event loop never blocks. Each ``call_soon_threadsafe`` writes to the loop's self-pipe (a syscall), so the
engine collects one step's wake-ups in a ``Wakeups`` and sends one call per event loop per step, not one per
delta. Dropping, closing or cancelling the reader aborts the request.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from typing import Callable

from .outputs import RequestOutput


class EngineError(RuntimeError):
    """The request failed inside the engine (its message says why); other requests keep running."""


class RequestFailed(EngineError):
    """This one request failed in a live engine (``bad_request``: because of its own input); the engine serves on."""

    def __init__(self, message: str, bad_request: bool = False):
        super().__init__(message)
        self.bad_request = bad_request

    def __reduce__(self):  # crosses process boundaries (Ray) with bad_request intact
        return type(self), (str(self), self.bad_request)


class RequestStream:
    def __init__(self, request_id: str, abort: Callable[[str], None]):
        self.request_id = request_id
        self._abort = abort
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # a sync reader waits here for an item
        self._sync_waiting = False
        self._items: collections.deque[RequestOutput | BaseException] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future | None = None
        self.keepalive: object = None  # the LLM handle that made it: its engine lives while the stream does
        self._done = False  # the reader has seen the last item
        self._closed = False

    # ---- engine side -------------------------------------------------------------------------------------
    def put(self, item: RequestOutput | BaseException, wakeups: "Wakeups | None" = None) -> None:
        """Queue one item and wake the reader; with ``wakeups``, an async reader is woken at ``wakeups.send()``."""
        with self._lock:
            self._items.append(item)
            loop, waiter = self._loop, self._waiter
            if self._sync_waiting:
                self._ready.notify()
        if loop is not None and waiter is not None:
            if wakeups is not None:
                wakeups.add(loop, waiter)
            else:
                _call_soon(loop, _wake_all, [waiter])

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
            item = self._wait_sync()
        except BaseException:  # KeyboardInterrupt while waiting: abort cleanly
            self.close()
            raise
        return self._deliver(item)

    def _wait_sync(self) -> RequestOutput | BaseException:
        with self._ready:
            while not self._items:
                self._sync_waiting = True
                try:
                    self._ready.wait()
                finally:
                    self._sync_waiting = False
            return self._items.popleft()

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


class Wakeups:
    """Async readers to wake after one engine step, grouped by event loop: one ``call_soon_threadsafe`` each."""

    def __init__(self):
        self._by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future) -> None:
        self._by_loop.setdefault(loop, []).append(waiter)

    def send(self) -> None:
        for loop, waiters in self._by_loop.items():
            _call_soon(loop, _wake_all, waiters)
        self._by_loop.clear()


def _call_soon(loop: asyncio.AbstractEventLoop, fn, waiters: list[asyncio.Future]) -> None:
    try:
        loop.call_soon_threadsafe(fn, waiters)
    except RuntimeError:  # the reader's loop is closed: nobody is listening any more
        pass


def _wake_all(waiters: list[asyncio.Future]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
