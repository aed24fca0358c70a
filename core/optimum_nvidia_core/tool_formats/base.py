"""What every model family's tool format provides, and the JSON reading the formats share.

A format knows four things about its family: how a call looks in a reply (markers, JSON shape), how to constrain
a forced call in that native form (the prompt prefix, the JSON schema, the text that closes it), how to read calls
back out of complete text, and how calls and their ids are written back into the history the template renders.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..guided import function_call_schema
from ..outputs import ToolCall
from ..tool_calls import new_call_id


class ToolFormat:
    name = "base"
    native = True  # the chat template renders tools, calls and results itself
    markers: tuple[str, ...] = ()  # text that opens a call in a reply
    bare_json = False  # a reply that opens with "{" may be a call (a streamed reply is held back from there)
    forced_prefix = ""  # appended to the prompt before a forced call's JSON
    forced_suffix = ""  # what follows the JSON in the native form (for the parser and the history)
    arguments_key = "arguments"  # the key the family's calls carry their arguments under
    parallel_forced = False  # a forced reply is a list of calls
    extra_end_of_turn: tuple[str, ...] = ()  # end-of-turn tokens besides the one the template closes turns with

    # ---- ids and history ---------------------------------------------------------------------------------
    def new_call_id(self) -> str:
        return new_call_id()

    def history_id(self, call_id: str) -> str:
        """The id a call from the caller's history gets in the prompt (the same one every time)."""
        return call_id

    def history(self, conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The normalized conversation as this family's template must receive it."""
        return [_with_ids(m, self.history_id) for m in conversation]

    # ---- forced calls ------------------------------------------------------------------------------------
    def forced_schema(self, functions: list[dict[str, Any]], one: bool = False) -> dict[str, Any]:
        """The JSON schema of a forced reply: a call of any of ``functions`` (validated specs); ``one``: exactly
        one call (a named tool_choice) where the family lists several."""
        return call_schema(functions, self.arguments_key)

    def wrap_forced(self, generated: str) -> str:
        """A forced reply as the model would have written it: what ``parse`` and the history read."""
        return self.forced_prefix + generated + self.forced_suffix

    # ---- parsing -----------------------------------------------------------------------------------------
    def parse(self, text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a complete reply; calls to names outside ``names`` stay in the content."""
        raise NotImplementedError


# ---- shared schema and JSON reading -------------------------------------------------------------------------
def call_schema(functions: list[dict[str, Any]], arguments_key: str = "arguments") -> dict[str, Any]:
    """{"name": const, <arguments_key>: the tool's parameters} for one of ``functions``, "name" first."""
    schema = function_call_schema(functions)
    if arguments_key == "arguments":
        return schema
    options = schema.get("anyOf", [schema])
    for option in options:
        option["properties"] = {"name": option["properties"]["name"],
                                arguments_key: option["properties"]["arguments"]}
        option["required"] = ["name", arguments_key]
    return schema


def call_list_schema(functions: list[dict[str, Any]], arguments_key: str = "arguments") -> dict[str, Any]:
    """A non-empty JSON list of calls (formats with parallel calls in one list)."""
    one = call_schema(functions, arguments_key)
    defs = one.pop("$defs", None)
    schema: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
    return {**schema, "$defs": defs} if defs else schema


def calls_in(payload: str, names: set[str], new_id) -> list[ToolCall]:
    """All calls in ``payload`` if it is nothing but call objects (or lists of them), else []."""
    values = json_values(payload)
    calls = [as_call(v, names, new_id) for v in values or []]
    return calls if calls and all(calls) else []  # type: ignore[return-value]


def json_values(payload: str) -> list[Any] | None:
    """The JSON values making up all of ``payload`` (lists flattened), or None if anything else is there."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(payload) and payload[i] in " \t\r\n;,":
            i += 1
        if i == len(payload):
            return values
        try:
            value, i = decoder.raw_decode(payload, i)
        except ValueError:
            return None
        values.extend(value if isinstance(value, list) else [value])


def as_call(value: Any, names: set[str], new_id) -> ToolCall | None:
    """A call object ({"name", "arguments" | "parameters"}, or OpenAI's {"function": {...}}) as a ToolCall."""
    if not isinstance(value, dict):
        return None
    fn = value.get("function") if isinstance(value.get("function"), dict) else value
    name = fn.get("name")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not isinstance(args, dict) or name not in names:
        return None
    return ToolCall(id=new_id(), name=name, arguments=args)


def _with_ids(message: Mapping[str, Any], history_id) -> dict[str, Any]:
    out = dict(message)
    if out.get("tool_calls"):
        out["tool_calls"] = [{**c, "id": history_id(c["id"])} for c in out["tool_calls"]]
    if out.get("tool_call_id") is not None:
        out["tool_call_id"] = history_id(out["tool_call_id"])
    return out
