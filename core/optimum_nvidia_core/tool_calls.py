"""Tool specs and tool_choice: validated once per request, read by the tool plan (``tool_formats.plan``).

Tools are OpenAI function specs: ``{"type": "function", "function": {"name", "description", "parameters"}}``
(a bare ``{"name", "description", "parameters"}`` works too). ``tool_choice`` is understood here and nowhere else,
in every spelling LangChain, LlamaIndex and OpenAI use. Nothing here knows a model's tool format or its template.
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any, Literal

from .guided import check_json_schema, function_call_schema
from .text_checks import check_unicode

TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
ChoiceMode = Literal["none", "auto", "required", "named"]
_AUTO = (None, "auto", False)
_REQUIRED = (True, "any", "required")


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


# ---- tool_choice ------------------------------------------------------------------------------------------------
def parse_tool_choice(tool_choice: Any, names: list[str]) -> tuple[ChoiceMode, str | None]:
    """(mode, tool name) for any spelling of ``tool_choice``; ``names`` are the tools offered.

    None / "auto" / False -> auto; "none" -> none; "any" / "required" / True -> required; a tool's name,
    {"type": "function", "function": {"name": ...}} or {"name": ...} -> named. Raises ValueError naming the fix.
    """
    mode, name = _choice(tool_choice)
    if mode in ("required", "named") and not names:
        raise ValueError(f"tool_choice={tool_choice!r} needs tools; pass tools=[...] or tool_choice=None")
    if mode == "named" and name not in names:
        raise ValueError(f"tool_choice names the tool {name!r}, which is not among the tools {names}; pass one "
                         "of those names, 'any', 'required', 'auto' or 'none'")
    return mode, name


def _choice(tool_choice: Any) -> tuple[ChoiceMode, str | None]:
    if tool_choice is None or tool_choice is False or (isinstance(tool_choice, str) and tool_choice == "auto"):
        return "auto", None
    if tool_choice is True or (isinstance(tool_choice, str) and tool_choice in ("any", "required")):
        return "required", None
    if tool_choice == "none":
        return "none", None
    if isinstance(tool_choice, str) and tool_choice:
        return "named", tool_choice
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function", tool_choice)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            return "named", fn["name"]
        if tool_choice.get("type") in ("auto", "any", "required", "none"):  # {"type": "any"} (Anthropic style)
            return _choice(tool_choice["type"])
    raise ValueError(f"tool_choice {tool_choice!r} is not understood; pass 'auto', 'none', 'any', 'required', a "
                     "tool's name or {'type': 'function', 'function': {'name': ...}}")


def tool_call_schema(tools: list[Mapping[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The generic schema of one call, {"name": const, "arguments": <parameters>}, for a forcing ``tool_choice``
    (None when nothing is forced). A model family's own shape comes from its format (``tool_formats``)."""
    specs = normalize_tools(tools)
    mode, name = parse_tool_choice(tool_choice, [t["function"]["name"] for t in specs])
    if mode in ("auto", "none"):
        return None
    return function_call_schema([t["function"] for t in specs if mode == "required" or t["function"]["name"] == name])


def constrained_reply(guided_json: Any, tool_choice: Any) -> str | None:
    """What a request's reply is constrained to ("the forced tool call", "the structured output"), or None; the
    plugins name it in the error for a reply cut off at max_tokens."""
    if guided_json is not None:
        return "the structured output"
    try:
        mode, _ = _choice(tool_choice)
    except ValueError:
        return None
    return "the forced tool call" if mode in ("required", "named") else None
