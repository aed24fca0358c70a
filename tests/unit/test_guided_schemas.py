"""Schemas whose every constraint is enforced or refused: length-limited strings that are valid JSON, keywords the
grammar would drop refused by name, allOf merged, oneOf only when exclusive, deep schemas a clear error."""
from __future__ import annotations

import json

import pytest

from guided_walk import closing_tokens, decoder, random_walk, token_pool, tokenizer, validate  # noqa: F401
from optimum_nvidia_core.guided import check_json_schema, grammar_from_text, schema_text
from optimum_nvidia_core.guided.keywords import MAX_DEPTH, UNENFORCED, enforceable_schema

pytestmark = pytest.mark.filterwarnings("ignore")

LENGTHS = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "minLength": 2, "maxLength": 6},
        "note": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 4}},
    },
    "required": ["code", "note", "tags"],
}


@pytest.fixture(scope="module")
def hostile_tokens(tokenizer):
    """Tokens holding a control character, a quote or a backslash: what a loose string rule lets through."""
    return token_pool(tokenizer, lambda t: any(ord(ch) < 0x20 or ch in '"\\' for ch in t))


def test_length_limited_strings_are_valid_json_on_many_seeds(decoder, tokenizer, hostile_tokens, closing_tokens):
    # xgrammar 0.2.9 alone admits raw control characters here: walks that favour them made invalid JSON.
    for seed in range(24):
        text = random_walk(decoder, tokenizer, LENGTHS, seed, [(hostile_tokens, 0.6), (closing_tokens, 0.3)])
        value = json.loads(text)  # strict: a raw control character inside a string raises
        assert not validate(value, LENGTHS, LENGTHS), (text, validate(value, LENGTHS, LENGTHS))


def test_length_limited_strings_still_allow_escapes(decoder, tokenizer):
    matcher = decoder.matcher({"type": "string", "maxLength": 3})
    for token in tokenizer.encode('"a\\n\\u00e9"', add_special_tokens=False):  # 3 characters, two of them escaped
        assert matcher.accept(token)
    assert matcher.allowed_eos()
    bad = decoder.matcher({"type": "string", "maxLength": 3})
    assert not all(bad.accept(t) for t in tokenizer.encode('"a\tb"', add_special_tokens=False))


REFUSED = [
    ({"not": {"type": "string"}}, "'not' at \\$"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems' at \\$"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "if": {"required": ["a"]}, "then": {}},
     "'if' at \\$"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "dependentRequired": {"a": ["b"]}}, "'dependentRequired' at \\$"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentSchemas": {"a": {}}},
     "'dependentSchemas'"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "'contains' at \\$"),
    ({"type": "object", "properties": {"x": {"$ref": "https://example.com/schema.json"}}},
     "'\\$ref' at \\$.properties.x.*not a local reference"),
    ({"$defs": {"a": {"$anchor": "A", "type": "integer"}}, "$ref": "#A"}, "'\\$ref' at \\$"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^a+$", "maxLength": 2}}},
     "'minLength/maxLength' at \\$.properties.a"),
    ({"type": "string", "format": "email", "maxLength": 30}, "'minLength/maxLength' at \\$"),
    ({"type": "string", "nullable": True}, "'nullable'"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "'oneOf' at \\$.*use anyOf"),
    ({"type": "object", "properties": {"deep": {"type": "array", "items": {"not": {"const": 1}}}}},
     "'not' at \\$.properties.deep.items"),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1},
                {"type": "object", "anyOf": [{"required": ["a"]}]}, {"anyOf": [{}]}]},
     "'allOf' at \\$.*'anyOf' different values"),
]


@pytest.mark.parametrize("schema,message", REFUSED, ids=[json.dumps(s)[:40] for s, _ in REFUSED])
def test_keywords_the_grammar_would_drop_are_refused_by_name(schema, message):
    with pytest.raises(ValueError, match=f"guided_json uses {message}"):
        check_json_schema(schema, "guided_json")


def test_all_of_is_merged_and_enforced(decoder, tokenizer, closing_tokens):
    schema = {
        "$defs": {"Named": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
                            "required": ["name"]}},
        "allOf": [{"$ref": "#/$defs/Named"},
                  {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}},
                   "required": ["age"]}],
    }
    merged = enforceable_schema(schema)
    assert "allOf" not in merged and merged["required"] == ["name", "age"]
    assert list(merged["properties"]) == ["name", "age"]
    for seed in range(6):  # a bare number, as xgrammar alone made, would fail here
        value = json.loads(random_walk(decoder, tokenizer, schema, seed, [(closing_tokens, 0.4)]))
        assert isinstance(value, dict) and not validate(value, merged, schema), value
    tighter = enforceable_schema({"allOf": [{"type": "integer", "minimum": 3}, {"type": "number", "minimum": 5,
                                                                                  "maximum": 9}]})
    assert tighter == {"type": "integer", "minimum": 5, "maximum": 9}
    with pytest.raises(ValueError, match="allOf parts at \\$ with types 'string' and 'integer': no value is both"):
        enforceable_schema({"allOf": [{"type": "string"}, {"type": "integer"}]}, "guided_json")


def test_one_of_with_exclusive_branches_is_accepted(decoder, tokenizer, closing_tokens):
    cat = {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
           "required": ["kind", "lives"]}
    dog = {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
           "required": ["kind", "good"]}
    schema = {"$defs": {"Cat": cat, "Dog": dog},
              "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}  # pydantic's discriminated union
    check_json_schema(schema, "guided_json")
    check_json_schema({"oneOf": [{"type": "string"}, {"type": "integer"}]})
    check_json_schema({"oneOf": [{"enum": [1, 2]}, {"const": 3}]})
    value = json.loads(random_walk(decoder, tokenizer, schema, 0, [(closing_tokens, 0.4)]))
    assert not validate(value, schema, schema)


def test_a_500_level_schema_is_a_clear_error_not_a_recursion_error():
    deep: dict = {"type": "integer"}
    for _ in range(500):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    with pytest.raises(ValueError, match=f"guided_json nests deeper than {MAX_DEPTH} levels .*use \\$defs|"
                                         f"guided_json nests deeper than {MAX_DEPTH} levels .*\\$ref"):
        check_json_schema(deep, "guided_json")
    nested_lists: list = []
    for _ in range(5000):
        nested_lists = [nested_lists]
    with pytest.raises(ValueError, match="guided_json nests too deeply to serialize"):
        check_json_schema({"type": "object", "default": nested_lists}, "guided_json")


def test_annotations_and_enforced_keywords_still_pass():
    for schema in (
        {"type": "string", "format": "email", "description": "x", "title": "t", "examples": ["a@b.c"]},
        {"type": "string", "format": "password"},  # an unknown format is an annotation, as JSON Schema says
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": False, "maxItems": 3},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}, "required": ["a"]},
    ):
        check_json_schema(schema, "guided_json")
        grammar_from_text(schema_text(schema), "guided_json")


@pytest.mark.parametrize("keyword", sorted(UNENFORCED))
def test_every_unenforced_keyword_is_refused_wherever_it_is(keyword):
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer", keyword: {}}}}}
    with pytest.raises(ValueError, match=f"uses '\\{keyword}' at \\$.properties.a.items" if keyword[0] == "$"
                       else f"uses '{keyword}' at \\$.properties.a.items"):
        check_json_schema(schema, "guided_json")
