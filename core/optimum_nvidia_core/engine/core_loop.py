"""The engine core's serving loop, the same in the core's own process (``core_proc``) and on an engine thread.

Between two steps it drains the commands that arrived (new requests join the running batch at the next step:
in-flight batching), then steps while work is left and sends each step's outputs. Commands and messages are plain
tuples of picklable values:

    in:  ("add", EngineCoreRequest)  ("abort", [(request_id, index or None), ...])
         ("call", call_id, method, args)  ("stop",)
    out: ("outputs", [EngineCoreOutput, ...])  ("rejected", request_id, exception)
         ("result", call_id, ok, value or exception)
"""
from __future__ import annotations

from typing import Any, Callable


# What a caller may run on the core between two steps (``LLM.stats``, ``perplexity``, ``save``).
CALLABLE = frozenset({"stats", "perplexity", "save", "info"})

Receive = Callable[[float | None], "tuple | None"]  # timeout (None: wait) -> a command, or None when none came
Send = Callable[[tuple], None]


def serve(core: Any, receive: Receive, send: Send) -> None:
    """Run until a "stop" command; a command that arrives while the core is idle wakes it at once."""
    while True:
        command = receive(0 if core.has_unfinished() else None)
        while command is not None:
            if not execute(core, command, send):
                return
            command = receive(0)
        if core.has_unfinished():
            outputs = core.step()
            if outputs:
                send(("outputs", outputs))


def execute(core: Any, command: tuple, send: Send) -> bool:
    """Apply one command; False for "stop"."""
    kind = command[0]
    if kind == "add":
        request = command[1]
        try:
            core.add_request(request)
        except Exception as exc:  # a bad request fails alone
            send(("rejected", request.request_id, exc))
    elif kind == "abort":
        for request_id, index in command[1]:
            core.abort_request(request_id, index)
    elif kind == "call":
        _, call_id, method, args = command
        try:
            if method not in CALLABLE:
                raise AttributeError(f"the engine core has no callable {method!r}")
            send(("result", call_id, True, getattr(core, method)(*args)))
        except Exception as exc:
            send(("result", call_id, False, exc))
    elif kind == "stop":
        return False
    return True
