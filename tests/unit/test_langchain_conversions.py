"""The LangChain plugin's own logic, without an engine: messages in, chunks out, tools, fields, sampling."""
from __future__ import annotations

import json

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel, ValidationError

from langchain_optimum_nvidia import ChatOptimumNvidia, OptimumNvidia
from langchain_optimum_nvidia.messages import chunk_message, to_chat_dicts
from langchain_optimum_nvidia.tools import convert_tools, normalize_tool_choice
from optimum_nvidia_core.outputs import Metrics, RequestOutput, ToolCall, Usage
from optimum_nvidia_core.plugin_options import ENGINE_FIELDS, SAMPLING_FIELDS


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Weather(BaseModel):
    """Weather in a city."""

    city: str


# ---- messages in ----------------------------------------------------------------------------------------------
def test_every_role_and_tool_round_trip():
    messages = [
        SystemMessage("be brief"),
        HumanMessage("1+2?", name="ann"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}]),
        ToolMessage("3", tool_call_id="call_1", name="add"),
        AIMessage("It is 3."),
        ChatMessage(role="user", content="thanks"),
    ]
    assert to_chat_dicts(messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": "add"},
        {"role": "assistant", "content": "It is 3."},
        {"role": "user", "content": "thanks"},
    ]


def test_list_content_keeps_text_and_drops_tool_use_blocks():
    message = AIMessage(
        [{"type": "text", "text": "some "}, "text", {"type": "tool_use", "id": "x", "name": "add", "input": {}}],
        tool_calls=[{"name": "add", "args": {}, "id": "x", "type": "tool_call"}],
    )
    (out,) = to_chat_dicts([message])
    assert out["content"] == "some text"
    assert out["tool_calls"][0]["function"]["name"] == "add"


def test_non_text_content_is_refused_with_a_clear_error():
    image = HumanMessage([{"type": "text", "text": "what is it?"}, {"type": "image", "base64": "AAAA",
                                                                        "mime_type": "image/png"}])
    with pytest.raises(ValueError, match="'image' content block.*text-only"):
        to_chat_dicts([image])


def test_unsupported_message_type_is_named():
    with pytest.raises(TypeError, match="RemoveMessage"):
        to_chat_dicts([RemoveMessage(id="1")])


# ---- chunks out -----------------------------------------------------------------------------------------------
def _last_delta(**kw):
    return RequestOutput(
        request_id="r", text=kw.pop("text", ""), finished=True, finish_reason=kw.pop("finish_reason", "stop"),
        usage=Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=4),
        metrics=Metrics(arrival_time=1.0, first_token_time=1.5, finished_time=2.5), **kw,
    )


def test_only_the_last_chunk_carries_usage_and_metadata():
    first = chunk_message(RequestOutput(request_id="r", text="Hel"), "m")
    last = chunk_message(_last_delta(text="lo"), "m")
    assert first.usage_metadata is None and first.response_metadata == {} and first.chunk_position is None
    assert last.usage_metadata == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10,
                                   "input_token_details": {"cache_read": 4}}
    assert last.chunk_position == "last"
    meta = last.response_metadata
    assert meta["model_name"] == "m" and meta["finish_reason"] == "stop"
    assert meta["time_to_first_token_s"] == pytest.approx(0.5) and meta["total_time_s"] == pytest.approx(1.5)
    assert meta["decode_tokens_per_s"] == pytest.approx(2.0)  # 2 tokens after the first, in 1 s
    full = first + last
    assert full.content == "Hello" and full.usage_metadata["total_tokens"] == 10


def test_tool_calls_become_chunks_with_ids_and_parse_on_merge():
    calls = [ToolCall(id="call_a", name="add", arguments={"a": 1, "b": 2}),
             ToolCall(id="call_b", name="shout", arguments={"text": "你好"})]
    last = chunk_message(_last_delta(tool_calls=calls, finish_reason="tool_calls"), "m")
    assert [c["id"] for c in last.tool_call_chunks] == ["call_a", "call_b"]
    assert json.loads(last.tool_call_chunks[1]["args"]) == {"text": "你好"}
    merged = AIMessageChunk(content="") + last
    assert merged.tool_calls == [
        {"name": "add", "args": {"a": 1, "b": 2}, "id": "call_a", "type": "tool_call"},
        {"name": "shout", "args": {"text": "你好"}, "id": "call_b", "type": "tool_call"},
    ]


# ---- tools ----------------------------------------------------------------------------------------------------
def test_tools_convert_from_every_langchain_form():
    def search(query: str) -> str:
        """Search the docs."""
        return query

    specs = convert_tools([add, Weather, search, {"type": "function", "function": {"name": "raw", "parameters": {}}}])
    assert [s["function"]["name"] for s in specs] == ["add", "Weather", "search", "raw"]
    assert specs[0]["function"]["parameters"]["required"] == ["a", "b"]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [(None, None), ("auto", None), (False, None), ("none", "none"), ("any", "required"), ("required", "required"),
     (True, "required"), ("add", "add"), ({"type": "function", "function": {"name": "Weather"}}, "Weather")],
)
def test_tool_choice_values(choice, expected):
    assert normalize_tool_choice(choice, convert_tools([add, Weather])) == expected


@pytest.mark.parametrize(("choice", "error"), [("multiply", "not among the tools"), (3, "is not understood"),
                                               ({"type": "function"}, "is not understood")])
def test_bad_tool_choice_is_refused_at_bind_time(choice, error):
    with pytest.raises(ValueError, match=error):
        ChatOptimumNvidia().bind_tools([add, Weather], tool_choice=choice)


def test_forcing_a_call_without_tools_is_refused():
    with pytest.raises(ValueError, match="needs tools"):
        normalize_tool_choice("any", [])


# ---- fields and sampling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ChatOptimumNvidia, OptimumNvidia])
def test_fields_alias_and_typos(cls):
    assert cls(model="some/model").model_id == "some/model" == cls(model_id="some/model").model_id
    with pytest.raises(ValidationError, match="unknown argument.*temprature"):
        cls(temprature=0.2)
    with pytest.raises(ValidationError, match="top_p"):
        cls(top_p=1.5)
    cls(api_key="unused", timeout=10, max_retries=2)  # remote-API arguments from generic code are accepted
    for name in ("model_id", "model_kwargs", *ENGINE_FIELDS, *SAMPLING_FIELDS):
        assert cls.model_fields[name].description, f"field {name} lost its description"


def test_sampling_params_from_fields_call_kwargs_and_stop():
    chat = ChatOptimumNvidia(temperature=0.0, max_tokens=12, stop=["\n"], seed=3)
    params = chat.sampling_params(None, {"top_k": 5, "max_tokens": 4})
    assert (params.temperature, params.max_tokens, params.top_k, params.seed, params.stop) == (0.0, 4, 5, 3, ["\n"])
    assert chat.sampling_params(["END"], {}).stop == ["END"]
    defaults = ChatOptimumNvidia().sampling_params(None, {})
    assert defaults.max_tokens == 256 and defaults.temperature == 1.0  # the core's defaults
    with pytest.raises(ValueError, match="unknown generation argument.*bogus"):
        chat.sampling_params(None, {"bogus": 1})


def test_engine_options_leave_defaults_to_the_engine():
    chat = ChatOptimumNvidia(max_batch_size=8, model_kwargs={"num_kv_blocks": 64})
    assert chat.engine_options() == {"use_fp8": False, "int4_method": "awq_bounded", "kv_cache_dtype": "auto",
                                     "max_batch_size": 8, "device": "auto", "num_kv_blocks": 64}


def test_ls_params_follow_call_overrides():
    chat = ChatOptimumNvidia(temperature=0.5, max_tokens=9)
    params = chat._get_ls_params(stop=["x"], model="other/model", temperature=0.1)
    assert params == {"ls_provider": "optimum_nvidia", "ls_model_name": "other/model", "ls_model_type": "chat",
                      "ls_temperature": 0.1, "ls_max_tokens": 9, "ls_stop": ["x"]}
    assert OptimumNvidia()._get_ls_params()["ls_model_type"] == "llm"


def test_with_structured_output_rejects_bad_arguments():
    chat = ChatOptimumNvidia()
    with pytest.raises(ValueError, match="unknown method"):
        chat.with_structured_output(Weather, method="xml")
    with pytest.raises(ValueError, match="needs a schema"):
        chat.with_structured_output(None)
    with pytest.raises(ValueError, match="unsupported argument"):
        chat.with_structured_output(Weather, temperature=0)
