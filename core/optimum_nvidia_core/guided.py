"""Constrained decoding: a JSON schema becomes a mask of the tokens allowed at each step, through xgrammar.

The engine asks ``GuidedDecoder.matcher(schema)`` for one ``Matcher`` per guided sequence, calls
``fill_mask(row)`` before sampling that sequence and ``accept(token)`` after; the request ends when
``is_terminated()`` (the JSON is complete and a stop token was accepted). Forced tool calls and structured output
(json_schema / json_mode) all come through here, so their output always parses and validates.

xgrammar is imported lazily: the core must import on machines without it (the GPU benchmark box), and only a guided
request there fails, with an ImportError that says how to fix it.
"""
from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

XGRAMMAR_MISSING = (
    "constrained decoding (guided_json, forced tool calls, structured output) needs the xgrammar package; "
    "install it with `pip install xgrammar`"
)
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


def _import_xgrammar() -> Any:
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
    """Raise a ValueError naming ``what`` when ``schema`` is not a JSON schema the grammar compiler can build.

    Without xgrammar installed only the shape is checked; a guided request then raises the ImportError.
    """
    if not isinstance(schema, dict):
        raise ValueError(f"{what} must be a dict holding a JSON schema, got {type(schema).__name__}")
    try:
        text = schema_text(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serializable ({exc}); use only dicts, lists, str, numbers, "
                         "bools and None") from None
    try:
        _import_xgrammar()
    except ImportError:
        return
    _grammar_from_text(text, what)


@functools.lru_cache(maxsize=256)
def _grammar_from_text(text: str, what: str = "the JSON schema") -> Any:
    xgr = _import_xgrammar()
    try:
        # Compact separators (", " and ": ", as json.dumps writes them) instead of free whitespace: a small model
        # under a mask that allows whitespace everywhere can loop on newlines until max_tokens.
        return xgr.Grammar.from_json_schema(text, any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{what} cannot be compiled into a grammar: {_compiler_message(exc)}; fix the schema "
                         "(supported: standard JSON Schema types, properties, required, enum, const, anyOf, "
                         "items, $ref to #/$defs)") from None


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
    return ref  # a remote ref: left for the grammar compiler to reject with its own message


def bitmask_to_bool(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's packed mask, int32 [ceil(V/32)] (bit b of word w = token 32*w + b), as bool [V], True = allowed.

    numpy's unpackbits does it in one pass (~10x faster than shifting in torch); the little-endian byte order
    of the int32 words is what makes "little" bit order line up with token ids.
    """
    bits = np.unpackbits(words.cpu().numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return torch.from_numpy(bits.view(np.bool_))


class Matcher:
    """The grammar state of one sequence. Not thread-safe; the engine thread owns it."""

    def __init__(self, grammar_matcher: Any, bitmask: torch.Tensor, vocab_size: int, stop_token_ids: list[int]):
        self._matcher = grammar_matcher
        self._bitmask = bitmask  # int32 [1, ceil(V/32)], reused every step
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids

    def fill_mask(self, mask_row: torch.Tensor) -> bool:
        """Write the allowed next tokens into ``mask_row`` (bool [V], True = allowed).

        Returns False when nothing is allowed (a finished grammar, or one no token can continue): the engine must
        then fail this request instead of sampling from an all-masked row.
        """
        if mask_row.dtype != torch.bool or tuple(mask_row.shape) != (self.vocab_size,):
            raise ValueError(f"mask_row must be a bool tensor of shape ({self.vocab_size},), got "
                             f"{mask_row.dtype} {tuple(mask_row.shape)}")
        if self._matcher.is_terminated():
            mask_row.zero_()
            return False
        self._matcher.fill_next_token_bitmask(self._bitmask)
        allowed = bitmask_to_bool(self._bitmask[0], self.vocab_size).numpy()
        if mask_row.device.type == "cpu":
            # A numpy copy: torch's intra-op threads turn this 50 KB copy into milliseconds on a busy CPU.
            np.copyto(mask_row.numpy(), allowed)
        else:
            mask_row.copy_(torch.from_numpy(allowed))
        return bool(allowed.any())

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) when the grammar does not allow it."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size or self._matcher.is_terminated():
            return False
        return bool(self._matcher.accept_token(token_id))

    def is_terminated(self) -> bool:
        """The JSON is complete and a stop token was accepted: the sequence is done."""
        return bool(self._matcher.is_terminated())

    def allowed_eos(self) -> bool:
        """Whether the output so far is a complete value, so a stop token may end it now."""
        return not self._matcher.is_terminated() and bool(self._matcher.is_completed())


class GuidedDecoder:
    """Builds the tokenizer's grammar vocabulary once and hands out matchers; compiled grammars are cached by schema.

    ``vocab_size`` is the width of the model's logits, which may exceed ``len(tokenizer)`` (padded embeddings);
    the extra ids are never allowed. ``stop_token_ids`` end a finished grammar (default: the tokenizer's EOS);
    pass the engine's EOS ids so a guided sequence stops the way an unguided one does.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int] | None = None,
                 max_cached_grammars: int = 256):
        self._xgr = _import_xgrammar()
        self.vocab_size = int(vocab_size)
        info = self._xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                        stop_token_ids=stop_token_ids)
        self.stop_token_ids = list(info.stop_token_ids)
        self._compiler = self._xgr.GrammarCompiler(info, cache_enabled=False)  # we cache, bounded, below
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._max_cached = max_cached_grammars
        self._lock = threading.Lock()

    def matcher(self, json_schema: dict[str, Any] | None = None) -> Matcher:
        """A fresh matcher for one sequence; ``None`` or ``{}`` accepts any JSON object."""
        compiled = self.compiled_grammar(json_schema)
        bitmask = self._xgr.allocate_token_bitmask(1, self.vocab_size)
        return Matcher(self._xgr.GrammarMatcher(compiled), bitmask, self.vocab_size, self.stop_token_ids)

    def compiled_grammar(self, json_schema: dict[str, Any] | None) -> Any:
        if json_schema is not None:
            check_json_schema(json_schema, "guided_json")
        key = schema_text(json_schema)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        compiled = self._compiler.compile_grammar(_grammar_from_text(key, "guided_json"))
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self._max_cached:
                self._compiled.popitem(last=False)
        return compiled

    @property
    def num_cached(self) -> int:
        return len(self._compiled)
