"""JSON schemas as grammars: the cache key, the checks, and the compile to an xgrammar ``Grammar``.

Every constraint a schema states is either enforced by the grammar or refused with an error naming the keyword
(``keywords.enforceable_schema``); xgrammar's own gaps are patched here (``_strict_string_characters``).
xgrammar is imported lazily: the core must import on machines without it.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

from .keywords import enforceable_schema

XGRAMMAR_MISSING = (
    "constrained decoding (guided_json, forced tool calls, structured output) needs the xgrammar package; "
    "install it with `pip install xgrammar`"
)
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}

# xgrammar 0.2.9 writes the characters of a length-limited string (minLength / maxLength) as this class, which
# admits raw control characters (invalid JSON) and no escapes. A JSON string character is anything but a control
# character, '"' or '\', or an escape; each counts as one character of the length.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = (r'(([^\0-\x1f\"\\]) | ("\\" [\"\\/bfnrt]) '
                     r'| ("\\u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9]))')


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:
        raise ImportError(XGRAMMAR_MISSING) from exc
    return xgrammar


def schema_text(json_schema: dict[str, Any] | None) -> str:
    """The schema as compact JSON, the cache key. ``None`` and ``{}`` mean "any JSON object".

    Keys are NOT sorted: property order in the schema is the order the grammar generates them in (a tool call
    must say its "name" before its "arguments"), so two orders are two different grammars.
    """
    schema = json_schema if json_schema else ANY_JSON_OBJECT
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def check_json_schema(schema: Any, what: str = "the JSON schema") -> None:
    """Raise a ValueError naming ``what`` when ``schema`` is not a JSON schema whose every constraint the grammar
    enforces. Without xgrammar installed only the shape and the keywords are checked; a guided request then
    raises the ImportError."""
    if not isinstance(schema, dict):
        raise ValueError(f"{what} must be a dict holding a JSON schema, got {type(schema).__name__}")
    enforceable_schema(schema, what)  # first: it also bounds the depth, before anything recurses
    try:
        text = schema_text(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serializable ({exc}); use only dicts, lists, str, numbers, "
                         "bools and None") from None
    except RecursionError:
        raise ValueError(f"{what} nests too deeply to serialize; flatten it") from None
    try:
        import_xgrammar()
    except ImportError:
        return
    grammar_from_text(text, what)


@functools.lru_cache(maxsize=256)
def grammar_from_text(text: str, what: str = "the JSON schema") -> Any:
    """The xgrammar Grammar of a schema_text(); a ValueError naming ``what`` when it cannot be built."""
    xgr = import_xgrammar()
    schema = enforceable_schema(json.loads(text), what)
    try:
        # Compact separators (", " and ": ", as json.dumps writes them) instead of free whitespace: a small model
        # under a mask that allows whitespace everywhere can loop on newlines until max_tokens.
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{what} cannot be compiled into a grammar: {_compiler_message(exc)}; fix the schema "
                         "(supported: standard JSON Schema types, properties, required, enum, const, anyOf, "
                         "items, $ref to #/$defs)") from None
    return _strict_string_characters(xgr, grammar)


def _strict_string_characters(xgr: Any, grammar: Any) -> Any:
    ebnf = str(grammar)
    if _LOOSE_STRING_CHAR not in ebnf:
        return grammar
    return xgr.Grammar.from_ebnf(ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR), root_rule_name="root")


def _compiler_message(exc: Exception) -> str:
    """xgrammar's C++ errors start with '[time] file.cc:line: '; keep only the message."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", first_line)


def function_call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """Schema of one call to any of ``functions`` (validated {"name", "parameters"} specs):
    {"name": <const>, "arguments": <that function's parameters>}, "name" first so the model picks the tool first."""
    defs: dict[str, Any] = {}
    calls = [_call_schema(fn, defs) for fn in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, "$defs": defs} if defs else schema


def _call_schema(fn: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": _arguments_schema(fn, defs)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _arguments_schema(fn: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The tool's parameters, inlined. When they use $ref, they move (with their $defs) to the root's $defs under
    the tool's name, with refs rewritten, because refs resolve from the root of the combined schema."""
    params = fn["parameters"]
    if '"$ref"' not in json.dumps(params):
        return params
    name = fn["name"]  # names have no '.', so "name.Def" never collides with another tool's entries
    local_defs = {**params.get("definitions", {}), **params.get("$defs", {})}
    for def_name, sub in local_defs.items():
        defs[f"{name}.{def_name}"] = _rebase_refs(sub, name)
    defs[name] = _rebase_refs({k: v for k, v in params.items() if k not in ("$defs", "definitions")}, name)
    return {"$ref": f"#/$defs/{name}"}


def _rebase_refs(node: Any, name: str) -> Any:
    if isinstance(node, list):
        return [_rebase_refs(v, name) for v in node]
    if not isinstance(node, Mapping):
        return node
    return {k: _rebase_ref(v, name) if k == "$ref" and isinstance(v, str) else _rebase_refs(v, name)
            for k, v in node.items()}


def _rebase_ref(ref: str, name: str) -> str:
    for head in ("#/$defs/", "#/definitions/"):
        if ref.startswith(head):
            return f"#/$defs/{name}.{ref[len(head):]}"
    if ref == "#" or ref.startswith("#/"):
        return f"#/$defs/{name}{ref[1:]}"
    return ref  # a remote ref: refused by the keyword check with its own message
