"""How the caller's side talks to the engine core: the same commands (``core_loop``) to a core in its own process
or on a thread of this one.

``ProcessCoreClient`` (the default) starts ``python -m optimum_nvidia_core.engine.core_proc`` — a fresh interpreter,
not a fork, so CUDA is never forked and the user's main module is never re-imported — over a socket pair.
``ThreadCoreClient`` runs the core on a daemon thread of this process (it shares the interpreter lock with the
application's threads). Both call ``on_message(message)`` for every message out of the core, on one thread of
their own, and ``("died", reason)`` once if the core stops without being asked to.
"""
from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from ..config import EngineConfig
from .interface import EngineInfo

OnMessage = Callable[[tuple], None]


class EngineStartError(RuntimeError):
    """The engine core process ended before it was ready (the message has its exit code)."""


class ProcessCoreClient:
    def __init__(self, config: EngineConfig, on_message: OnMessage):
        self._on_message = on_message
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "optimum_nvidia_core.engine.core_proc", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=_child_env(), stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._stopping = False
        self.info = self._handshake(config)
        self._reader = threading.Thread(target=self._read, name="engine-core-reader", daemon=True)
        self._reader.start()

    def _handshake(self, config: EngineConfig) -> EngineInfo:
        try:
            self._conn.send(config)
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            self._conn.close()
            raise EngineStartError(f"the engine core process exited with code {code} while loading the model; "
                                   "its output above says why") from None
        if kind == "failed":
            self.process.wait()
            self._conn.close()
            raise value
        return value

    @property
    def alive(self) -> bool:
        return not self._stopping and self.process.poll() is None

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, command: tuple) -> None:
        with self._send_lock:
            self._conn.send(command)

    def _read(self) -> None:
        try:
            while True:
                self._on_message(self._conn.recv())
        except (EOFError, OSError):
            pass
        if not self._stopping:
            code = self.process.wait()
            self._on_message(("died", f"the engine core process exited with code {code}"))

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        try:
            self.send(("stop",))
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._conn.close()

    def forget(self) -> None:
        """In a forked child: drop this process's copy of the socket without telling the core anything (it
        belongs to the parent)."""
        self._stopping = True
        try:
            self._conn.close()
        except OSError:
            pass


class ThreadCoreClient:
    def __init__(self, config: EngineConfig, on_message: OnMessage, name: str = "optimum-nvidia-engine"):
        from .core import EngineCore

        self.core = EngineCore(config)
        self.info = self.core.info()
        self._on_message = on_message
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._stopping and self._thread.is_alive()

    @property
    def pid(self) -> int:
        return os.getpid()

    def send(self, command: tuple) -> None:
        self._commands.put(command)

    def _receive(self, timeout: float | None) -> tuple | None:
        try:
            return self._commands.get(timeout=timeout) if timeout != 0 else self._commands.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        from .core_loop import serve

        try:
            serve(self.core, self._receive, self._on_message)
        except BaseException as exc:  # noqa: BLE001 - report any death to the callers
            import logging

            logging.getLogger(__name__).exception("engine thread died")
            self._on_message(("died", f"the engine thread stopped after an error: {exc!r}"))
            return
        if not self._stopping:
            self._on_message(("died", "the engine thread stopped"))

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._commands.put(("stop",))
        if timeout > 0 and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def forget(self) -> None:
        self._stopping = True


def _child_env() -> dict[str, str]:
    """This environment, with the directory this package was imported from first on the child's path (it may
    come from PYTHONPATH, an editable install or a path the application added at run time)."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    # OpenMP workers that spin between the CPU path's small parallel ops starve the core's other threads (and
    # the application's process) of the cores: measured up to 50x slower steps on a busy 2-core machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env
