"""guided/: JSON-schema token masks through xgrammar, with the real SmolLM2 tokenizer.

The main check walks the grammar like a sampler would: pick a random allowed token under the mask (biased towards
tokens that close strings and objects so walks end quickly), accept it, repeat until the matcher terminates, then
check that the text parses and validates against the schema.
"""
from __future__ import annotations

import json
import sys
from typing import Literal

import pytest
import torch
from pydantic import BaseModel

from guided_walk import PADDED_VOCAB, closing_tokens, decoder, random_walk, tokenizer, validate  # noqa: F401
from optimum_nvidia_core.guided import GuidedDecoder, bitmask_to_bool, check_json_schema
from optimum_nvidia_core.tool_calls import tool_call_schema


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


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walks_under_the_mask_give_valid_json(decoder, tokenizer, closing_tokens, name):
    schema = SCHEMAS[name]
    for seed in range(3):
        text = random_walk(decoder, tokenizer, schema, seed, [(closing_tokens, 0.4)])
        value = json.loads(text)
        assert isinstance(value, dict)
        errors = validate(value, schema or {"type": "object"}, schema or {})
        assert not errors, f"{text!r} breaks the schema: {errors}"


def test_forced_call_walks_name_a_tool_and_match_its_schema(decoder, tokenizer, closing_tokens):
    names = set()
    for seed in range(6):
        call = json.loads(random_walk(decoder, tokenizer, SCHEMAS["forced_any_tool"], seed,
                                       [(closing_tokens, 0.4)]))
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


def test_the_vocabulary_builds_in_the_background_also_from_a_model_directory(decoder, tokenizer, smollm2_dir):
    from_dir = GuidedDecoder(smollm2_dir, PADDED_VOCAB)  # what the engine core, with no tokenizer object, does
    schema = SCHEMAS["forced_person_tool"]
    a, b = decoder.matcher(schema), from_dir.matcher(schema)  # waits for the vocabulary
    assert from_dir.ready and from_dir.stop_token_ids == decoder.stop_token_ids
    row_a, row_b = torch.zeros(PADDED_VOCAB, dtype=torch.bool), torch.zeros(PADDED_VOCAB, dtype=torch.bool)
    for piece in ['{"name": "save_person", "arguments": {"name": "', "Ada"]:
        assert a.fill_mask(row_a) and b.fill_mask(row_b) and torch.equal(row_a, row_b)
        for token in tokenizer.encode(piece, add_special_tokens=False):
            assert a.accept(token) and b.accept(token)
    from_dir.close()


def test_matchers_come_from_the_pool_and_a_cached_grammar_is_ready_at_once(tokenizer):
    pytest.importorskip("xgrammar")
    fresh = GuidedDecoder(tokenizer, PADDED_VOCAB)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    matchers = fresh.matchers_async(schema, n=3).result(timeout=60)
    assert len(matchers) == 3 and len({id(m.grammar_matcher) for m in matchers}) == 3  # one state per sequence
    again = fresh.matchers_async(schema, n=2)
    assert again.done() and len(again.result()) == 2 and fresh.num_cached == 1
    failing = fresh.matchers_async({"type": "integer", "minimum": 5, "maximum": 2})
    with pytest.raises(ValueError, match="guided_json cannot be compiled into a grammar"):
        failing.result(timeout=60)
    fresh.close()


def test_the_step_bitmask_holds_each_matchers_mask(decoder, tokenizer):
    from optimum_nvidia_core.guided import GrammarBitmask
    from optimum_nvidia_core.layers.token_bitmask import apply_token_bitmask

    matchers = [decoder.matcher(SCHEMAS[name]) for name in ("person", "forced_any_tool", "list_of_numbers")]
    for token in tokenizer.encode('{"name": "', add_special_tokens=False):
        assert matchers[0].accept(token)
    done = decoder.matcher({"const": 1})
    for token in tokenizer.encode("1", add_special_tokens=False):
        assert done.accept(token)  # complete: only the stop tokens are allowed next
    matchers.append(done)
    bitmask = GrammarBitmask(max_rows=8, vocab_size=PADDED_VOCAB, device="cpu")
    expected = torch.zeros(len(matchers), PADDED_VOCAB, dtype=torch.bool)
    for _ in range(2):  # the two alternating buffers
        bitmask.fill(matchers)
        for k, m in enumerate(matchers):
            assert m.fill_mask(expected[k])
        assert bitmask.allows_any().tolist() == [True] * 4
        eos = decoder.stop_token_ids
        assert [bitmask.allows_other_than(k, eos) for k in range(4)] == [True, True, True, False]
        rows = [0, 2, 3, 5]  # the logits rows they constrain, among 6 sampled rows
        on_device = bitmask.to_device(rows)
        logits = torch.randn(6, PADDED_VOCAB)
        masked = apply_token_bitmask(logits, on_device)
        assert torch.equal(torch.isfinite(masked[rows]), expected)
        assert torch.equal(masked[[1, 4]], logits[[1, 4]])  # unguided rows untouched
    with pytest.raises(ValueError, match="9 guided rows, but the bitmask holds 8"):
        bitmask.fill(matchers * 2 + [done])
