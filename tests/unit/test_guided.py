"""guided.py: JSON-schema token masks through xgrammar, with the real SmolLM2 tokenizer.

The main check walks the grammar like a sampler would: pick a random allowed token under the mask (biased towards
tokens that close strings and objects so walks end quickly), accept it, repeat until the matcher terminates, then
check that the text parses and validates against the schema.
"""
from __future__ import annotations

import json
import random
import sys
from typing import Any, Literal

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from optimum_nvidia_core.tool_calls import tool_call_schema
from optimum_nvidia_core.guided import GuidedDecoder, bitmask_to_bool, check_json_schema

PADDED_VOCAB = 49152 + 64  # logits wider than the tokenizer, as with padded embeddings


class Address(BaseModel):
    city: str
    zip_code: int | None = None


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]
    address: Address
    kind: Literal["friend", "colleague"]
    score: float
    active: bool


TOOLS = [
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "save_person", "parameters": Person.model_json_schema()}},
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
]

SCHEMAS = {
    "any_object": {},
    "person": Person.model_json_schema(),
    "forced_any_tool": tool_call_schema(TOOLS, "any"),
    "forced_person_tool": tool_call_schema(TOOLS, "save_person"),
    "list_of_numbers": {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "number"}}},
                        "required": ["xs"]},
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    """The real SmolLM2 tokenizer, from the directory the engine loads (converted once from the packaged GGUF)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def decoder(tokenizer):
    pytest.importorskip("xgrammar")
    return GuidedDecoder(tokenizer, PADDED_VOCAB)


@pytest.fixture(scope="module")
def closing_tokens(tokenizer):
    """bool [V] (numpy): tokens whose text has a quote, a closing bracket or a digit (they end strings and objects)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    closing = [any(ch in piece for ch in '"}]0123456789') for piece in pieces]
    return np.array(closing + [False] * (PADDED_VOCAB - len(pieces)))


def random_walk(decoder, tokenizer, closing, schema, seed, max_steps=400) -> str:
    """Sample like the engine would, uniformly among allowed tokens (numpy: torch's threads crawl on a busy CPU)."""
    rng = random.Random(seed)
    matcher = decoder.matcher(schema)
    row = torch.zeros(PADDED_VOCAB, dtype=torch.bool)
    allowed = row.numpy()  # shares memory with row
    out: list[int] = []
    for _ in range(max_steps):
        assert matcher.fill_mask(row), f"the mask allows nothing after {tokenizer.decode(out)!r}"
        assert not allowed[len(tokenizer):].any(), "padding ids beyond the tokenizer must never be allowed"
        stops = [t for t in decoder.stop_token_ids if allowed[t]]
        assert bool(stops) == matcher.allowed_eos()
        if stops and rng.random() < 0.3:
            token = stops[0]
        else:
            closing_allowed = allowed & closing
            pool = closing_allowed if rng.random() < 0.4 and closing_allowed.any() else allowed
            token = int(rng.choice(np.flatnonzero(pool)))
        assert matcher.accept(token)
        if matcher.is_terminated():
            assert token in decoder.stop_token_ids
            return tokenizer.decode(out)
        out.append(token)
    raise AssertionError(f"no termination within {max_steps} tokens: {tokenizer.decode(out)!r}")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walks_under_the_mask_give_valid_json(decoder, tokenizer, closing_tokens, name):
    schema = SCHEMAS[name]
    for seed in range(3):
        text = random_walk(decoder, tokenizer, closing_tokens, schema, seed)
        value = json.loads(text)
        assert isinstance(value, dict)
        errors = validate(value, schema or {"type": "object"}, schema or {})
        assert not errors, f"{text!r} breaks the schema: {errors}"


def test_forced_call_walks_name_a_tool_and_match_its_schema(decoder, tokenizer, closing_tokens):
    names = set()
    for seed in range(6):
        call = json.loads(random_walk(decoder, tokenizer, closing_tokens, SCHEMAS["forced_any_tool"], seed))
        assert list(call) == ["name", "arguments"]  # the name comes first, as the model should decide it first
        names.add(call["name"])
    assert names <= {"add", "get_weather", "save_person", "ping"} and len(names) >= 2


def test_bitmask_conversion_matches_xgrammar(decoder):
    xgr = pytest.importorskip("xgrammar")
    torch.manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (1, (PADDED_VOCAB + 31) // 32), dtype=torch.int32)
    logits = torch.zeros(1, PADDED_VOCAB)
    xgr.apply_token_bitmask_inplace(logits, words)
    assert torch.equal(bitmask_to_bool(words[0], PADDED_VOCAB), logits[0] == 0)


def test_accept_rejects_disallowed_tokens_and_a_terminated_matcher_allows_nothing(decoder, tokenizer):
    matcher = decoder.matcher({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    row = torch.zeros(PADDED_VOCAB, dtype=torch.bool)
    assert not matcher.accept(tokenizer.encode("hello", add_special_tokens=False)[0])
    assert not matcher.accept(PADDED_VOCAB - 1) and not matcher.accept(-1)
    for token in tokenizer.encode('{"ok": true}', add_special_tokens=False):
        assert matcher.accept(token)
    assert matcher.allowed_eos() and not matcher.is_terminated()
    assert matcher.fill_mask(row) and row.nonzero().flatten().tolist() == decoder.stop_token_ids
    assert matcher.accept(decoder.stop_token_ids[0]) and matcher.is_terminated()
    assert matcher.fill_mask(row) is False and not row.any()
    with pytest.raises(ValueError, match=r"bool tensor of shape \(49216,\)"):
        matcher.fill_mask(torch.zeros(10, dtype=torch.bool))


def test_compiled_grammars_are_cached_by_schema(tokenizer):
    pytest.importorskip("xgrammar")
    decoder = GuidedDecoder(tokenizer, PADDED_VOCAB, max_cached_grammars=2)
    a = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}
    reordered = {"type": "object", "properties": {"y": {"type": "string"}, "x": {"type": "integer"}}}
    assert decoder.compiled_grammar(a) is decoder.compiled_grammar(json.loads(json.dumps(a)))
    assert decoder.compiled_grammar(None) is decoder.compiled_grammar({})  # both mean any JSON object
    assert decoder.num_cached == 2
    decoder.compiled_grammar(reordered)  # property order is generation order: a different grammar
    assert decoder.num_cached == 2  # bounded: the least recently used one went


def test_invalid_schemas_are_clear_errors(decoder):
    with pytest.raises(ValueError, match="guided_json cannot be compiled into a grammar: minLength 5 is greater"):
        decoder.matcher({"type": "string", "minLength": 5, "maxLength": 2})
    with pytest.raises(ValueError, match="must be a dict holding a JSON schema, got list"):
        check_json_schema([1, 2], "guided_json")
    with pytest.raises(ValueError, match="not JSON-serializable"):
        check_json_schema({"type": "object", "default": {1, 2}}, "guided_json")


def test_missing_xgrammar_says_how_to_install_it(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # makes `import xgrammar` raise ImportError
    with pytest.raises(ImportError, match="pip install xgrammar"):
        GuidedDecoder(tokenizer, PADDED_VOCAB)
    check_json_schema({"type": "object"})  # prompts with tools still work without it: only the shape is checked


# ---- a tiny JSON-schema validator for the schemas above (jsonschema is not installed) ----------------------------
def validate(value: Any, schema: dict, root: dict, path: str = "$") -> list[str]:
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return validate(value, target, root, path)
    if "anyOf" in schema:
        if all(validate(value, s, root, path) for s in schema["anyOf"]):
            return [f"{path}: matches no anyOf branch"]
        return []
    errors = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} != const {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    kind = schema.get("type")
    checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "null": lambda v: v is None}
    if kind is not None and not checks[kind](value):
        return errors + [f"{path}: {value!r} is not of type {kind}"]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for key, item in value.items():
            if key in properties:
                errors += validate(item, properties[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False or (properties and kind == "object"):
                errors.append(f"{path}: unexpected property {key!r}")  # xgrammar is strict: no extra keys
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], root, f"{path}[{i}]")
    return errors
