"""A real uvicorn server on 127.0.0.1 (a free port), in a background thread of the test process.

In-process so that tests can read the engine's ``llm.stats()`` (leaked blocks) and restart it; the clients still
talk to it over real sockets.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from optimum_nvidia_core.server.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, engine: Any, **app_options: Any):
        self.engine = engine
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(engine, **app_options)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 300
        while not (self.server.started and self.engine.state == "ready"):
            if self.engine.state == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.engine.failure}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on the server's event loop (e.g. engine.restart()) and wait for it."""
        loop = self.server_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(300)

    def server_loop(self) -> asyncio.AbstractEventLoop:
        return self.engine._load_task.get_loop()
