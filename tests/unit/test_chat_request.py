"""chat_request.py: the prompt and params of a chat request; structured output tells the model its keys."""
from __future__ import annotations

import pytest

from optimum_nvidia_core.chat_request import ChatRequestBuilder, json_instruction, with_json_instruction
from optimum_nvidia_core.sampling_params import SamplingParams

CITY = {"type": "object", "properties": {"city": {"type": "string", "description": "the city's name"},
                                         "country": {"type": "string"}}, "required": ["city", "country"]}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def builder(smollm2_dir):
    """On the real SmolLM2 tokenizer (plain ChatML)."""
    from transformers import AutoTokenizer

    return ChatRequestBuilder(AutoTokenizer.from_pretrained(str(smollm2_dir)))


def _prompt(builder, messages, params, **kw):
    ids, params, forced = builder.prepare(messages, params, **kw)
    return builder.tokenizer.decode(ids), params, forced


def test_json_instruction_names_the_keys():
    assert json_instruction(CITY) == 'Answer in JSON with the keys "city" (the city\'s name) and "country".'
    assert json_instruction({"type": "object"}) == "Answer with a JSON object."
    odd = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert json_instruction(odd).startswith("Answer in JSON that follows this JSON schema: {")
    plain = with_json_instruction([{"role": "user", "content": "Paris?"}], {"type": "object"})
    assert plain == [{"role": "system", "content": "Answer with a JSON object."}, {"role": "user", "content": "Paris?"}]
    joined = with_json_instruction([{"role": "system", "content": "Be brief."}, plain[1]], {"type": "object"})
    assert joined[0]["content"] == "Be brief.\n\nAnswer with a JSON object." and len(joined) == 2


def test_object_schema_puts_the_keys_in_the_system_turn(builder):
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "Where is the Eiffel Tower?"}]
    text, params, forced = _prompt(builder, messages, SamplingParams(guided_json=CITY))
    assert "<|im_start|>system\nBe brief.\n\nAnswer in JSON with the keys \"city\" (the city's name)" in text
    assert params.guided_json == CITY and not forced
    assert "Answer" not in _prompt(builder, messages, SamplingParams())[0]


def test_only_object_schemas_and_not_forced_calls_get_the_hint(builder):
    messages = [{"role": "user", "content": "A number?"}]
    assert "Answer" not in _prompt(builder, messages, SamplingParams(guided_json={"type": "integer"}))[0]
    text, params, forced = _prompt(builder, [{"role": "user", "content": "1 + 2?"}], SamplingParams(),
                                   tools=[ADD], tool_choice="add")
    assert forced and params.guided_json is not None
    assert "Answer in JSON" not in text and text.endswith("<tool_call>\n")
