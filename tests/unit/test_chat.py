"""chat.py + tool_calls.py: messages and tools through chat templates, tool-call parsing, forced-call schemas.

Uses the real SmolLM2 tokenizer (plain ChatML, no tool support -> the <tool_call> fallback) and, through
``chat_template=``, a Llama-3.1-style template that reads ``tools`` and a strict template that raises.
"""
from __future__ import annotations

import copy
import json

import pytest

from optimum_nvidia_core.chat import ChatFormatter, normalize_messages
from optimum_nvidia_core.tool_calls import (
    forced_call_prefix, normalize_tools, parse_tool_calls, tool_call_schema, wrap_forced_call,
)


LLAMA3_TOOLS_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message }}
{%- if tools is not none %}
{{- '\\nRespond with a JSON for a function call: {"name": function name, "parameters": arguments}.\\n' }}
{%- for t in tools %}{{- t | tojson }}{{- '\\n' }}{%- endfor %}
{%- endif %}
{{- '<|eot_id|>' }}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls is defined %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- for tc in message.tool_calls %}
{{- '{"name": "' + tc.function.name + '", "parameters": ' + (tc.function.arguments | tojson) + '}' }}
{%- endfor %}
{{- '<|eot_id|>' }}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

STRICT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '[' + message['role'] + '] ' + message['content'] + '\\n' }}{% endfor %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    """The real SmolLM2 tokenizer, from the directory the engine loads (converted once from the packaged GGUF)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def smol(tokenizer):
    return ChatFormatter(tokenizer)


def user(text):
    return {"role": "user", "content": text}


# ---- rendering --------------------------------------------------------------------------------------------------
def test_plain_chat_matches_the_models_own_template(smol, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, user("Hi"), {"role": "assistant", "content": "Hello!"},
                user("Name a colour.")]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert smol.render(messages) == expected
    assert smol.render(messages, add_generation_prompt=False).endswith("Name a colour.<|im_end|>\n")


def test_text_parts_are_joined_and_developer_is_system(smol):
    parts = [{"type": "text", "text": "first"}, "second", {"type": "input_text", "text": "third"}]
    text = smol.render([{"role": "developer", "content": "rules"}, {"role": "user", "content": parts}])
    assert "<|im_start|>system\nrules<|im_end|>" in text
    assert "first\nsecond\nthird" in text


@pytest.mark.parametrize("messages, match", [
    ([], "messages is empty"),
    ([{"role": "robot", "content": "beep"}], "unknown role 'robot'"),
    (["hello"], "must be a dict with 'role'"),
    ([{"role": "user", "content": "bad \ud800 text"}], "lone surrogate"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
     "content part of type 'image_url'; this model reads text only"),
    ([{"role": "user", "content": None}], "content of type NoneType"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     "not valid JSON"),
])
def test_bad_messages_name_the_problem(smol, messages, match):
    with pytest.raises(ValueError, match=match):
        smol.render(messages)


def test_template_that_raises_becomes_a_clear_error(tokenizer):
    strict = ChatFormatter(tokenizer, chat_template=STRICT_TEMPLATE)
    assert strict.render([user("a"), {"role": "assistant", "content": "b"}], add_generation_prompt=False) \
        == "[user] a\n[assistant] b\n"
    with pytest.raises(ValueError, match=r"chat template rejected these messages \(roles \['user', 'user'\]\).*"
                                         r"must alternate.*Reorder"):
        strict.render([user("a"), user("b")])


def test_missing_template_is_a_clear_error_or_read_from_model_dir(tokenizer, tmp_path):
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template .*add a chat_template.jinja file to the model.s directory"):
        ChatFormatter(bare).render([user("hi")])
    (tmp_path / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    assert ChatFormatter(bare, model_dir=tmp_path).render([user("hi")]) == "[user] hi\n"


# ---- tools in prompts -------------------------------------------------------------------------------------------
def test_fallback_lists_tools_in_a_system_turn(smol):
    assert not smol.native_tools and smol.tool_call_prefix == "<tool_call>\n"
    text = smol.render([user("Weather in Paris?")], TOOLS)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(WEATHER) in system and json.dumps(ADD) in system
    assert "<tool_call>" in system and "You are a helpful AI assistant" not in text
    with_system = smol.render([{"role": "system", "content": "Be brief."}, user("hi")], TOOLS, tool_choice="add")
    assert with_system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "Call the function 'add'." in with_system
    assert "# Tools" not in smol.render([user("hi")], TOOLS, tool_choice="none")


def test_fallback_history_round_trips_calls_and_results(smol):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [user("Weather in Paris and 2+3?"),
                {"role": "assistant", "content": None, "tool_calls": [call, {"id": "call_2", "function": {
                    "name": "add", "arguments": {"a": 2, "b": 3}}}]},
                {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "5"}]
    text = smol.render(messages, TOOLS)
    assistant = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    content, calls = parse_tool_calls(assistant, TOOLS)
    assert content == ""
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"}), ("add", {"a": 2, "b": 3})]
    assert ("<|im_start|>user\n<tool_response>\n22C\n</tool_response>\n<tool_response>\n5\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in text


def test_native_template_gets_tools_and_dict_arguments(tokenizer):
    llama = ChatFormatter(tokenizer, chat_template=LLAMA3_TOOLS_TEMPLATE)
    assert llama.native_tools and llama.tool_call_prefix == ""
    messages = [user("2+3?"), {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    text = llama.render(messages, [ADD])
    assert '"name": "add"' in text and "Respond with a JSON for a function call" in text
    assert '{"name": "add", "parameters": {"a": 2, "b": 3}}' in text  # a dict, not a double-encoded string
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n5<|eot_id|>" in text
    assert "Respond with a JSON" not in llama.render([user("hi")])


@pytest.mark.parametrize("tools, match", [
    ([{"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}}], "invalid name"),
    ([ADD, ADD], "two tools are named 'add'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "of type 'object'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}],
     "parameters schema of tool 'f' cannot be compiled into a grammar: Unsupported type \"nonsense\""),
    ([{"type": "retrieval"}], "only 'function' tools"),
    ("get_weather", "must be a list"),
])
def test_bad_tools_name_the_tool(tools, match):
    with pytest.raises(ValueError, match=match):
        normalize_tools(tools)


def test_tools_accept_bare_function_dicts_and_default_parameters():
    tools = normalize_tools([{"name": "ping", "description": "Ping"}])
    assert tools == [{"type": "function", "function": {
        "name": "ping", "description": "Ping", "parameters": {"type": "object", "properties": {}}}}]


def test_normalized_messages_carry_dict_arguments_and_ids():
    out = normalize_messages([{"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": ""}}]}])
    call = out[0]["tool_calls"][0]
    assert out[0]["content"] == "" and call["function"] == {"name": "f", "arguments": {}}
    assert call["id"].startswith("call_") and call["type"] == "function"


# ---- parsing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', "", [("add", {"a": 1, "b": 2})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
     '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 1}"}</tool_call>', "Let me check.",
     [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 1})]),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}', "", [("add", {"a": 1, "b": 2})]),  # cut off
    ('{"name": "add", "parameters": {"a": 4, "b": 5}}', "", [("add", {"a": 4, "b": 5})]),  # Llama 3
    ('<|python_tag|>{"name": "add", "parameters": {"a": 4, "b": 5}}', "", [("add", {"a": 4, "b": 5})]),
    ('```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```', "", [("get_weather", {"city": "Rome"})]),
    ('[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 3, "b": 4}}]', "",
     [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 3, "b": 4}}', "",
     [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ('{"type": "function", "function": {"name": "add", "arguments": "{\\"a\\": 0, \\"b\\": 0}"}}', "",
     [("add", {"a": 0, "b": 0})]),
])
def test_parse_tool_calls_formats(text, content, calls):
    got_content, got = parse_tool_calls(text, TOOLS)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in got)
    assert len({c.id for c in got}) == len(got)


@pytest.mark.parametrize("text", [
    "The answer is 42.",
    '{"answer": 42}',  # JSON, but not a call
    '{"name": "delete_everything", "arguments": {}}',  # unknown tool
    '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>',  # broken JSON
    '{"name": "add", "arguments": {"a": 1}} and some prose',
])
def test_non_calls_stay_content(text):
    assert parse_tool_calls(text, TOOLS) == (text, [])


def test_without_tools_any_name_is_a_call():
    content, calls = parse_tool_calls('{"name": "anything", "arguments": {}}', None)
    assert content == "" and calls[0].name == "anything"


# ---- forced calls -----------------------------------------------------------------------------------------------
def test_tool_call_schema_choices():
    one = tool_call_schema(TOOLS, "add")
    assert one["properties"]["name"] == {"const": "add"}
    assert one["properties"]["arguments"] == ADD["function"]["parameters"]
    assert list(one["properties"]) == ["name", "arguments"] and one["required"] == ["name", "arguments"]
    assert tool_call_schema(TOOLS, {"type": "function", "function": {"name": "add"}}) == one
    for choice in ("any", "required", True):
        both = tool_call_schema(TOOLS, choice)
        assert [s["properties"]["name"]["const"] for s in both["anyOf"]] == ["get_weather", "add"]
    assert tool_call_schema([ADD], "required") == one
    for choice in (None, "auto", "none"):
        assert tool_call_schema(TOOLS, choice) is None


def test_tool_call_schema_errors():
    with pytest.raises(ValueError, match=r"'multiply', which is not among the tools \['get_weather', 'add'\]"):
        tool_call_schema(TOOLS, "multiply")
    with pytest.raises(ValueError, match="needs tools"):
        tool_call_schema([], "any")
    with pytest.raises(ValueError, match="not understood"):
        tool_call_schema(TOOLS, 3)


def test_tool_call_schema_moves_refs_to_the_root():
    params = {"type": "object", "properties": {"home": {"$ref": "#/$defs/Address"},
                                               "work": {"$ref": "#/properties/home"}},
              "required": ["home"],
              "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    schema = tool_call_schema([{"name": "move", "parameters": params}, ADD], "any")
    assert schema["anyOf"][0]["properties"]["arguments"] == {"$ref": "#/$defs/move"}
    assert schema["$defs"]["move"]["properties"] == {"home": {"$ref": "#/$defs/move.Address"},
                                                     "work": {"$ref": "#/$defs/move/properties/home"}}
    assert "city" in schema["$defs"]["move.Address"]["properties"]
    normalize_tools([{"name": "combined", "parameters": {**schema, "type": "object"}}])  # the result compiles


def test_forced_prefix_and_wrap_round_trip(smol, tokenizer):
    assert forced_call_prefix(smol) == "<tool_call>\n"
    wrapped = wrap_forced_call('{"name": "add", "arguments": {"a": 1, "b": 2}}', smol)
    assert wrapped.startswith("<tool_call>\n") and wrapped.endswith("\n</tool_call>")
    assert [(c.name, c.arguments) for c in parse_tool_calls(wrapped, TOOLS)[1]] == [("add", {"a": 1, "b": 2})]
    llama = ChatFormatter(tokenizer, chat_template=LLAMA3_TOOLS_TEMPLATE)
    assert wrap_forced_call('{"name": "add", "arguments": {}}', llama) == '{"name": "add", "arguments": {}}'


def test_separate_tool_use_template_is_picked_when_tools_are_given(tokenizer):
    both = copy.copy(tokenizer)
    both.chat_template = {"default": STRICT_TEMPLATE, "tool_use": LLAMA3_TOOLS_TEMPLATE}
    formatter = ChatFormatter(both)
    assert formatter.native_tools and formatter.tool_call_prefix == ""
    assert formatter.render([user("hi")]) == "[user] hi\n"
    assert "Respond with a JSON for a function call" in formatter.render([user("hi")], [ADD])
