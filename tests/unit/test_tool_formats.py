"""Each family's real chat template (tests/fixtures/chat_templates) with its native tool format: rendering equals
transformers, the format is detected from template + tokenizer, calls the template writes are read back, forced
calls come out in the native form through the engine, and every end-of-turn token stops generation."""
from __future__ import annotations

import json

import pytest

from chat_families import FAMILIES, family_tokenizer, write_family_model
from optimum_nvidia_core import LLM, SamplingParams
from optimum_nvidia_core.chat import ChatFormatter
from optimum_nvidia_core.chat_request import ChatRequestBuilder
from optimum_nvidia_core.guided import check_json_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"], "description": "the city"}},
                   "required": ["city"]}}}
UNITS = {"type": "function", "function": {
    "name": "set_units", "description": "Choose the units",
    "parameters": {"type": "object", "properties": {"metric": {"type": "boolean", "description": "metric or not"}},
                   "required": ["metric"]}}}
TOOLS = [WEATHER, UNITS]
NATIVE = [f for f, spec in FAMILIES.items() if spec["format"] != "fallback"]
PARALLEL = {"llama3.1": False, "llama3.2": False}  # Llama 3 templates render one call per turn


def _call(call_id, name, **args):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def two_tool_turns(family):
    """system, user, call(s), result(s), answer, user, call, result: two tool turns (ids valid for Mistral)."""
    first = [_call("abcDEF123", "get_weather", city="Paris")]
    if PARALLEL.get(family, True):
        first.append(_call("xyz987QRS", "set_units", metric=True))
    results = [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": "22 C"}
               for c in first]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": first}, *results,
            {"role": "assistant", "content": "It is 22 C."}, {"role": "user", "content": "And Rome?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("Rome00001", "get_weather", city="Rome")]},
            {"role": "tool", "tool_call_id": "Rome00001", "name": "get_weather", "content": "25 C"}]


@pytest.fixture(scope="module")
def tokenizers():
    return {family: family_tokenizer(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made = {}

    def make(family, first=None, silent=False, seed=0):
        key = (family, first, silent, seed)
        if key not in made:
            made[key] = write_family_model(tmp_path_factory.mktemp("family"), family, first=first, silent=silent,
                                           seed=seed)
        return made[key]

    return make


# ---- templates -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_format_is_detected_from_template_and_tokenizer(family, tokenizers):
    assert ChatFormatter(tokenizers[family]).tool_format.name == FAMILIES[family]["format"]


@pytest.mark.parametrize("family", NATIVE)
def test_rendering_equals_transformers_over_two_tool_turns(family, tokenizers):
    tokenizer = tokenizers[family]
    messages = two_tool_turns(family)
    expected = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ChatFormatter(tokenizer).render(messages, TOOLS) == expected


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NATIVE])
def test_rendering_equals_transformers_without_tools(family, tokenizers):
    tokenizer = tokenizers[family]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather?"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ChatFormatter(tokenizer).render(messages) == expected


@pytest.mark.parametrize("family", NATIVE)
def test_the_calls_a_template_writes_are_read_back(family, tokenizers):
    """What the template renders for an assistant's calls is what that family's parser reads."""
    formatter = ChatFormatter(tokenizers[family])
    messages = two_tool_turns(family)[1:3]  # (Mistral's v3 template moves a system message to the last turn)
    prompt = formatter.render(messages[:1], TOOLS)
    full = formatter.render(messages, TOOLS, add_generation_prompt=False)
    assert full.startswith(prompt)
    reply = full[len(prompt):]
    for token in FAMILIES[family]["end_of_turn"]:
        reply = reply.split(token)[0]
    content, calls = formatter.tool_format.parse(reply, {"get_weather", "set_units"})
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in messages[1]["tool_calls"]]
    assert content == "" and [(c.name, c.arguments) for c in calls] == expected


def test_mistral_ids_from_any_history_are_mapped_to_nine_characters(tokenizers):
    """The v3 template refuses ids that are not 9 letters or digits; LangChain's and LlamaIndex's ids are not."""
    tokenizer = tokenizers["mistral-nemo"]
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [_call("call_0123456789abcdef01234567",
                                                                         "get_weather", city="Paris")]},
               {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "22 C"}]
    with pytest.raises(Exception, match="length 9"):
        tokenizer.apply_chat_template(history, tools=TOOLS, tokenize=False)
    formatter = ChatFormatter(tokenizer)
    text = formatter.render(history, TOOLS)
    mapped = formatter.tool_format.history_id("call_0123456789abcdef01234567")
    assert len(mapped) == 9 and mapped.isalnum() and text.count(f'"{mapped}"') == 2
    assert formatter.render(history, TOOLS) == text  # the same id every time (prefix caching still hits)
    unanswered = [*history[:2], {"role": "tool", "content": "22 C"}]  # a result without an id answers its call
    assert formatter.render(unanswered, TOOLS) == text


def test_llama3_history_with_parallel_calls_becomes_one_call_per_turn(tokenizers):
    formatter = ChatFormatter(tokenizers["llama3.1"])
    history = [{"role": "user", "content": "Weather and units?"},
               {"role": "assistant", "content": "", "tool_calls": [_call("a", "get_weather", city="Paris"),
                                                                   _call("b", "set_units", metric=True)]},
               {"role": "tool", "tool_call_id": "a", "content": "22 C"},
               {"role": "tool", "tool_call_id": "b", "content": "ok"}]
    text = formatter.render(history, TOOLS)  # the template alone raises "only supports single tool-calls"
    assert text.index('"get_weather"', text.index("Weather and units?")) < text.index("22 C") \
        < text.index('{"name": "set_units"') < text.index('"ok"<|eot_id|>')


# ---- forced calls in the native form --------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tool_choice", ["any", "set_units"])
def test_forced_call_prompt_and_schema_are_native(family, tool_choice, tokenizers):
    builder = ChatRequestBuilder(tokenizers[family])
    ids, params, plan = builder.prepare([{"role": "user", "content": "Weather in Paris?"}], SamplingParams(),
                                        tools=TOOLS, tool_choice=tool_choice)
    text = tokenizers[family].decode(ids)
    fmt = plan.format
    assert plan.forced and text.endswith(fmt.forced_prefix)
    check_json_schema(params.guided_json)
    schema = params.guided_json
    one = schema["items"] if fmt.parallel_forced else schema
    options = one.get("anyOf", [one])
    assert [o["properties"]["name"]["const"] for o in options] == (
        ["get_weather", "set_units"] if tool_choice == "any" else ["set_units"])
    assert all(list(o["properties"]) == ["name", fmt.arguments_key] for o in options)
    example = {"name": "set_units", fmt.arguments_key: {"metric": True}}
    generated = json.dumps([example] if fmt.parallel_forced else example)
    assert [(c.name, c.arguments) for c in plan.parse(generated)[1]] == [("set_units", {"metric": True})]
    assert set(FAMILIES[family]["end_of_turn"]) <= set(tokenizers[family].convert_ids_to_tokens(
        params.stop_token_ids))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forced_calls_end_to_end(family, family_dir):
    # Random weights: with "any", a family that lists calls (Mistral) may go on listing until max_tokens; the
    # weights of seed 2 close the list (a named tool_choice allows exactly one call, whatever the weights).
    llm = LLM(str(family_dir(family, seed=2)), device="cpu")
    try:
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        for choice, names in [("any", {"get_weather", "set_units"}), ("get_weather", {"get_weather"})]:
            out = llm.chat(messages, SamplingParams(max_tokens=48, temperature=0), tools=TOOLS, tool_choice=choice)
            assert out.finish_reason == "tool_calls" and out.tool_calls and {c.name for c in out.tool_calls} <= names
            assert len(out.token_ids) == out.usage.completion_tokens
            if FAMILIES[family]["format"] == "mistral":
                assert all(len(c.id) == 9 and c.id.isalnum() for c in out.tool_calls)
        auto = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0), tools=TOOLS)
        assert len(auto.token_ids) == auto.usage.completion_tokens
    finally:
        llm.shutdown()


# ---- end of turn ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, token", [(f, t) for f, spec in FAMILIES.items() for t in spec["end_of_turn"]])
def test_every_end_of_turn_token_stops_generation(family, token, family_dir):
    """A model that always emits ``token`` stops after it, as an end of turn (never shown)."""
    llm = LLM(str(family_dir(family, first=token, silent=True)), device="cpu")
    try:
        tools = TOOLS if family.startswith("hermes") else None  # (only their tool_use template is vendored)
        out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4, temperature=0), tools=tools)
        assert (out.finish_reason, out.usage.completion_tokens, out.text) == ("stop", 1, "")
    finally:
        llm.shutdown()
