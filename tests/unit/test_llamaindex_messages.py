"""OptimumNvidiaLLM's conversions and arguments, without an engine: messages, tools, tool choice, responses."""
from __future__ import annotations

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ImageBlock,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.tools import FunctionTool
from pydantic import ValidationError

from llamaindex_optimum_nvidia import OptimumNvidiaLLM
from llamaindex_optimum_nvidia.messages import (
    chat_response,
    keep_first_tool_call,
    to_chat_dicts,
    to_tool_choice,
    tool_selections,
)
from optimum_nvidia_core.outputs import Metrics, RequestOutput, ToolCall, Usage
from optimum_nvidia_core.plugin_options import ENGINE_FIELDS, SAMPLING_FIELDS


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_messages_become_chat_dicts_with_tool_round_trip():
    assistant = ChatMessage(role=MessageRole.ASSISTANT, blocks=[
        TextBlock(text="Let me compute."),
        ToolCallBlock(tool_call_id="call_1", tool_name="multiply", tool_kwargs={"a": 6, "b": 7}),
    ])
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
        ChatMessage(role=MessageRole.USER, content="6 times 7?"),
        assistant,
        ChatMessage(role=MessageRole.TOOL, content="42", additional_kwargs={"tool_call_id": "call_1"}),
    ]
    assert to_chat_dicts(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "6 times 7?"},
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "multiply", "arguments": {"a": 6, "b": 7}}}]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]


def test_openai_style_tool_calls_in_additional_kwargs_are_read():
    message = ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": [
        {"id": "c9", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 2, "b": 3}'}}]})
    (out,) = to_chat_dicts([message])
    assert out["tool_calls"] == [
        {"id": "c9", "type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}}]


def test_non_text_blocks_are_refused_with_a_clear_error():
    message = ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(image=b"\x89PNG", image_mimetype="image/png")])
    with pytest.raises(ValueError, match="text-only model"):
        to_chat_dicts([message])


@pytest.mark.parametrize(("choice", "required", "expected"), [
    (None, False, None), ("auto", False, "auto"), (None, True, "required"), ("auto", True, "required"),
    ("none", True, "none"), ("multiply", False, "multiply"),
    ({"type": "function", "function": {"name": "multiply"}}, False, {"type": "function", "function": {"name": "multiply"}}),
])
def test_tool_choice(choice, required, expected):
    """tool_required forces a call; every other spelling goes to the core's one tool_choice reader as it is."""
    assert to_tool_choice(choice, required) == expected


def test_tool_choice_dict_without_a_name_fails_clearly():
    from optimum_nvidia_core.tool_calls import parse_tool_choice

    with pytest.raises(ValueError, match="is not understood"):
        parse_tool_choice(to_tool_choice({"type": "function"}, False), ["multiply"])


def _finished(text: str, calls: list[ToolCall]) -> RequestOutput:
    return RequestOutput(request_id="r", text=text, finished=True, finish_reason="tool_calls" if calls else "stop",
                         usage=Usage(prompt_tokens=10, completion_tokens=4), metrics=Metrics(arrival_time=1.0),
                         tool_calls=calls)


def test_finished_response_carries_tool_calls_and_usage():
    calls = [ToolCall("c1", "multiply", {"a": 1, "b": 2}), ToolCall("c2", "multiply", {"a": 3, "b": 4})]
    response = chat_response("", _finished("", calls), "smol")
    assert response.message.content is None  # no text: tool-call blocks only
    selections = tool_selections(response.message)
    assert [(s.tool_id, s.tool_name, s.tool_kwargs) for s in selections] == [
        ("c1", "multiply", {"a": 1, "b": 2}), ("c2", "multiply", {"a": 3, "b": 4})]
    assert response.additional_kwargs["total_tokens"] == 14
    assert response.additional_kwargs["finish_reason"] == "tool_calls"
    assert response.raw["tool_calls"][0]["name"] == "multiply"  # a plain, serializable dict
    single = keep_first_tool_call(response)
    assert [s.tool_id for s in tool_selections(single.message)] == ["c1"]


def test_fields_and_sampling_overrides():
    llm = OptimumNvidiaLLM(model="some/model", temperature=0.0, max_tokens=8, max_batch_size=4,
                           model_kwargs={"num_kv_blocks": 64})
    assert llm.model_id == "some/model"
    assert llm.engine_options() == {"use_fp8": False, "int4_method": "awq_bounded", "kv_cache_dtype": "auto",
                                    "max_batch_size": 4, "device": "auto", "num_kv_blocks": 64}
    params = llm.sampling_params(None, {"top_k": 3, "max_tokens": 2, "seed": None})
    assert (params.temperature, params.max_tokens, params.top_k) == (0.0, 2, 3)
    with pytest.raises(ValueError, match="unknown generation argument"):
        llm.sampling_params(None, {"frobnicate": 1})


def test_shared_fields_keep_their_docs_and_checks():
    fields = OptimumNvidiaLLM.model_fields
    for name in ("model_id", "model_kwargs", *ENGINE_FIELDS, *SAMPLING_FIELDS):
        assert fields[name].description, f"field {name} lost its description"
    assert fields["model_id"].alias == "model"
    with pytest.raises(ValidationError, match="top_p"):
        OptimumNvidiaLLM(top_p=0.0)
    assert OptimumNvidiaLLM(presence_penalty=0.5).sampling_params(None, {}).presence_penalty == 0.5


def test_prepare_chat_with_tools_forces_a_call_when_required():
    llm = OptimumNvidiaLLM()
    tool = FunctionTool.from_defaults(fn=multiply)
    prepared = llm._prepare_chat_with_tools([tool], user_msg="6 times 7?", tool_required=True)
    assert prepared["tool_choice"] == "required"
    assert prepared["tools"][0]["function"]["name"] == "multiply"
    assert set(prepared["tools"][0]["function"]["parameters"]["properties"]) == {"a", "b"}
    assert prepared["messages"][-1].content == "6 times 7?"
    auto = llm._prepare_chat_with_tools([tool], chat_history=[ChatMessage(content="hi")])
    assert auto["tool_choice"] is None and len(auto["messages"]) == 1


def test_no_tool_call_raises_only_when_asked():
    llm = OptimumNvidiaLLM()
    response = ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content="I think 42."))
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="tool_required=True"):
        llm.get_tool_calls_from_response(response)
