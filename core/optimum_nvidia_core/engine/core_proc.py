"""The engine core in its own process: ``python -m optimum_nvidia_core.engine.core_proc FD``.

Started by ``core_client.ProcessCoreClient`` with one end of a socket pair as FD. The user's Python threads
(retrieval, parsing, web servers, callbacks) live in the other process, so they never hold the interpreter lock
this loop needs for every step. Protocol: the first message in is the EngineConfig; the first message out is
("ready", EngineInfo) or ("failed", exception); then ``core_loop``'s commands and messages. A sender thread writes
the outputs, so a slow reader never stalls a step. The process ends on "stop", or when the caller's end of the
socket closes (the caller exited or was killed); it ignores Ctrl-C, which the caller handles.
"""
from __future__ import annotations

import pickle
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    config = conn.recv()
    try:
        from .core import EngineCore

        core = EngineCore(config)
    except BaseException as exc:  # noqa: BLE001 - the caller re-raises it
        conn.send(("failed", picklable(exc)))
        return
    conn.send(("ready", core.info()))
    sender = Sender(conn)
    try:
        from .core_loop import serve

        serve(core, lambda timeout: receive(conn, timeout), sender.send)
    except (EOFError, OSError):
        pass  # the caller went away
    except BaseException as exc:  # noqa: BLE001 - report the death, then exit
        sender.send(("died", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        sender.close()


def receive(conn: Connection, timeout: float | None) -> tuple | None:
    return conn.recv() if conn.poll(timeout) else None


class Sender:
    """Writes messages on its own thread, in order."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-core-sender", daemon=True)
        self._thread.start()

    def send(self, message: tuple) -> None:
        self._queue.put(message)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            for message in batch:
                try:
                    self._conn.send(picklable_message(message))
                except (EOFError, OSError):
                    return

    def _next_batch(self) -> list[tuple] | None:
        """Every message waiting, consecutive step outputs merged into one: when the reader falls behind (its
        process is busy), it catches up with one read for many steps instead of one read per step."""
        message = self._queue.get()
        batch: list[tuple] = []
        while message is not None:
            if batch and message[0] == "outputs" and batch[-1][0] == "outputs":
                batch[-1] = ("outputs", batch[-1][1] + message[1])
            else:
                batch.append(message)
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                return batch
        self._queue.put(None)  # the stop marker: send what came before it, then end
        return batch or None


def picklable(exc: BaseException) -> BaseException:
    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def picklable_message(message: tuple) -> tuple:
    if message[0] == "rejected":
        return (*message[:2], picklable(message[2]))
    if message[0] == "result" and not message[2]:
        return (*message[:3], picklable(message[3]))
    return message


if __name__ == "__main__":
    main(int(sys.argv[1]))
