"""Tool specs, tool_choice, forced-call schemas and tool-call parsing: the tool half of a chat request.

Tools are OpenAI function specs: ``{"type": "function", "function": {"name", "description", "parameters"}}``
(a bare ``{"name", "description", "parameters"}`` works too). ``chat.ChatFormatter`` puts them in the prompt;
this module validates them, builds the JSON schema a forced call is generated under (``tool_call_schema``) and
reads calls back out of generated text (``parse_tool_calls``).
"""
from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .guided import check_json_schema, function_call_schema
from .outputs import ToolCall
from .text_checks import check_unicode

if TYPE_CHECKING:
    from .chat import ChatFormatter

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.x prefix before a JSON tool call
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
FORCING_CHOICES = ("any", "required")
AUTO_CHOICES = (None, "auto", "none")


def new_call_id() -> str:
    """A fresh OpenAI-style call id (``call_`` + 24 hex digits)."""
    return "call_" + secrets.token_hex(12)


# ---- tool specs -------------------------------------------------------------------------------------------------
def normalize_tools(tools: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Validated OpenAI function specs. Also takes a bare {"name", "description", "parameters"}.

    Every ``parameters`` schema must compile into a grammar (so a forced call can be constrained); a bad one
    raises a ValueError that names the tool.
    """
    if not tools:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of function specs, got {type(tools).__name__}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        spec = _function_spec(i, tool)
        if spec["name"] in seen:
            raise ValueError(f"two tools are named {spec['name']!r}; tool names must be unique")
        seen.add(spec["name"])
        out.append({"type": "function", "function": spec})
    return out


def _function_spec(i: int, tool: Any) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise ValueError(f"tools[{i}] must be a dict like {{'type': 'function', 'function': {{'name': ..., "
                         f"'parameters': {{...}}}}}}, got {type(tool).__name__}")
    fn = tool.get("function", tool)
    if not isinstance(fn, Mapping):
        raise ValueError(f"tools[{i}]['function'] must be a dict with 'name' and 'parameters'")
    if tool.get("type", "function") != "function":
        raise ValueError(f"tools[{i}] has type {tool.get('type')!r}; only 'function' tools are supported")
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME_PATTERN.match(name):
        raise ValueError(f"tools[{i}] has an invalid name {name!r}; use 1-64 letters, digits, '_' or '-'")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ValueError(f"tool {name!r}: description must be a string")
    check_unicode(description, f"tool {name!r} description")
    parameters = fn.get("parameters")
    parameters = {"type": "object", "properties": {}} if parameters is None else parameters
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise ValueError(f"tool {name!r}: parameters must be a JSON schema of type 'object' (the arguments "
                         f"object), got {parameters!r:.120}")
    parameters = dict(parameters)
    check_json_schema(parameters, f"the parameters schema of tool {name!r}")
    return {"name": name, "description": description, "parameters": parameters}


def tool_names(tools: list[Mapping[str, Any]] | None) -> list[str]:
    """Names of OpenAI specs or bare function dicts, without validating them (cheap; used when parsing)."""
    return [t.get("function", t).get("name") for t in tools or [] if isinstance(t, Mapping)]


def tool_call_schema(tools: list[Mapping[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema a forced call is generated under: {"name": const, "arguments": <the tool's parameters>}.

    ``tool_choice``: "any" / "required" / True -> any of the tools; a tool's name (or {"type": "function",
    "function": {"name": ...}}) -> that tool; None / "auto" / "none" -> None (nothing forced).
    """
    if tool_choice in AUTO_CHOICES or tool_choice is False:
        return None
    tools = normalize_tools(tools)
    if not tools:
        raise ValueError(f"tool_choice={tool_choice!r} needs tools; pass tools=[...] or tool_choice=None")
    if tool_choice is True or tool_choice in FORCING_CHOICES:
        chosen = tools
    else:
        name = choice_name(tool_choice)
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise ValueError(f"tool_choice names the tool {name!r}, which is not among the tools "
                             f"{tool_names(tools)}; pass one of those names, 'any', 'required', 'auto' or 'none'")
    return function_call_schema([t["function"] for t in chosen])


def choice_name(tool_choice: Any) -> str:
    """The tool a ``tool_choice`` names: a name, or {"type": "function", "function": {"name": ...}}."""
    if isinstance(tool_choice, str):
        return tool_choice
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function", tool_choice)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            return fn["name"]
    raise ValueError(f"tool_choice {tool_choice!r} is not understood; pass 'auto', 'none', 'any', 'required', a "
                     "tool's name or {'type': 'function', 'function': {'name': ...}}")


def forced_call_prefix(formatter: "ChatFormatter") -> str:
    """Text to append after the generation prompt so that a forced call only has to be a JSON object."""
    return formatter.tool_call_prefix


def wrap_forced_call(generated_json: str, formatter: "ChatFormatter") -> str:
    """The forced call as the model would have written it (prefix + JSON + closing tag): ``parse_tool_calls`` and
    the chat history both read it."""
    prefix = formatter.tool_call_prefix
    closing = "\n" + TOOL_CALL_CLOSE if TOOL_CALL_OPEN in prefix else ""
    return prefix + generated_json + closing


# ---- parsing ----------------------------------------------------------------------------------------------------
def parse_tool_calls(text: str, tools: list[Mapping[str, Any]] | None = None) -> tuple[str, list[ToolCall]]:
    """Split generated text into (content, tool calls).

    Understands ``<tool_call>{...}</tool_call>`` blocks (Hermes/Qwen; the closing tag may be cut off), and a reply
    that is only JSON (Llama 3.x ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>`` or in a
    ```json fence; "arguments" works too; an object, a list, or several separated by ';'). Calls to names not in
    ``tools`` (when given) are not calls: their text stays in the content, so nothing is lost.
    """
    allowed = None if tools is None else set(tool_names(tools))
    calls: list[ToolCall] = []
    pieces, last = [], 0
    for block in re.finditer(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)",
                             text, flags=re.DOTALL):
        found = _calls_in(block.group(1), allowed)
        if found:
            calls += found
            pieces.append(text[last:block.start()])
            last = block.end()
    if calls:
        return ("".join(pieces) + text[last:]).strip(), calls
    found = _calls_in(_strip_wrappers(text), allowed)
    return ("", found) if found else (text, [])


def _strip_wrappers(text: str) -> str:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    return fence.group(1) if fence else body


def _calls_in(payload: str, allowed: set[str] | None) -> list[ToolCall]:
    """All calls in ``payload`` if it is nothing but call objects, else []."""
    values = _json_values(payload)
    calls = [_as_call(v, allowed) for v in values or []]
    return calls if calls and all(calls) else []  # type: ignore[return-value]


def _json_values(payload: str) -> list[Any] | None:
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


def _as_call(value: Any, allowed: set[str] | None) -> ToolCall | None:
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
    if not isinstance(name, str) or not isinstance(args, dict) or (allowed is not None and name not in allowed):
        return None
    return ToolCall(id=new_call_id(), name=name, arguments=args)
