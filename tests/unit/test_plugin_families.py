"""Both plugins on every family's real chat template (tiny random checkpoints, CPU): a conversation of two tool
turns and a final answer, with tool_choice named, "any" and auto; the history (calls, ids, results) goes back
through the template each turn. Random weights under the grammar still produce valid native calls.

The calls go back into the history under ids of another provider's style ("call_1_0"): generated ids are random
(a Mistral id is part of the next prompt, which would make the random model's next reply vary run to run), and
foreign ids are what a Mistral template must have mapped to its 9 characters."""

from typing import Literal

import pytest

from chat_families import FAMILIES, write_family_model

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")


def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """Current weather in a city."""
    return f"22 C in {city}"


def set_units(metric: bool) -> str:
    """Choose the units."""
    return "ok"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    made = {}

    def make(family):
        if family not in made:  # seed 2: its random weights close a Mistral call list (see test_tool_formats)
            made[family] = write_family_model(tmp_path_factory.mktemp(family), family, seed=2)
        return str(made[family])

    return make


def _options(model_dir):
    return {"model": model_dir, "device": "cpu", "temperature": 0, "max_tokens": 48, "max_seq_len": 4096}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_langchain_two_tool_turns(family, model_dirs):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    from langchain_optimum_nvidia import ChatOptimumNvidia

    chat = ChatOptimumNvidia(**_options(model_dirs(family)))
    tools = [tool(get_weather), tool(set_units)]
    history = [HumanMessage("Weather in Paris?")]
    try:
        turns = [("get_weather", {"get_weather"}), ("any", {"get_weather", "set_units"})]
        for turn, (choice, names) in enumerate(turns):
            # one call per forced reply: a random model may go on listing calls (Mistral) until max_tokens
            message = chat.bind_tools(tools, tool_choice=choice, parallel_tool_calls=False).invoke(history)
            assert message.tool_calls and {c["name"] for c in message.tool_calls} <= names
            assert message.response_metadata["finish_reason"] == "tool_calls"
            calls = [{**c, "id": f"call_{turn}_{k}"} for k, c in enumerate(message.tool_calls)]
            history += [AIMessage(message.content, tool_calls=calls),
                        *[ToolMessage("22 C", tool_call_id=c["id"]) for c in calls]]
        final = chat.bind_tools(tools).invoke(history, max_tokens=4)
        assert isinstance(final, AIMessage) and final.usage_metadata["output_tokens"] <= 4
    finally:
        chat.get_llm().shutdown()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llamaindex_two_tool_turns(family, model_dirs):
    from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
    from llama_index.core.tools import FunctionTool

    from llamaindex_optimum_nvidia import OptimumNvidiaLLM

    llm = OptimumNvidiaLLM(**_options(model_dirs(family)))
    tools = [FunctionTool.from_defaults(fn=get_weather), FunctionTool.from_defaults(fn=set_units)]
    history = [ChatMessage(role=MessageRole.USER, content="Weather in Paris?")]
    try:
        for turn, (kwargs, names) in enumerate([({"tool_choice": "get_weather"}, {"get_weather"}),
                                                ({"tool_required": True}, {"get_weather", "set_units"})]):
            response = llm.chat_with_tools(tools, chat_history=history, **kwargs)  # one call per forced reply
            calls = llm.get_tool_calls_from_response(response)
            assert calls and {c.tool_name for c in calls} <= names
            blocks = [ToolCallBlock(tool_call_id=f"call_{turn}_{k}", tool_name=c.tool_name, tool_kwargs=c.tool_kwargs)
                      for k, c in enumerate(calls)]
            history += [ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks), *[
                ChatMessage(role=MessageRole.TOOL, content="22 C", additional_kwargs={"tool_call_id": b.tool_call_id})
                for b in blocks]]
        final = llm.chat_with_tools(tools, chat_history=history, max_tokens=4)
        assert final.message.role == MessageRole.ASSISTANT
        assert llm.get_tool_calls_from_response(final, error_on_no_tool_call=False) is not None
    finally:
        llm.get_llm().shutdown()


def test_reasoning_comes_apart_in_both_plugins(model_dirs):
    """DeepSeek-R1 distill: the prompt opens <think>, so a reply (here cut off before </think>) is all reasoning."""
    from llama_index.core.base.llms.types import ChatMessage, MessageRole, ThinkingBlock

    from langchain_optimum_nvidia import ChatOptimumNvidia
    from llamaindex_optimum_nvidia import OptimumNvidiaLLM

    options = {**_options(model_dirs("deepseek-r1-distill-llama")), "max_tokens": 6}
    chat = ChatOptimumNvidia(**options)
    try:
        chunks = list(chat.stream("Why is the sky blue?", ignore_eos=True))
        message = sum(chunks[1:], chunks[0])
        reasoning = message.additional_kwargs["reasoning_content"]
        assert reasoning and message.content == ""
        assert len([c for c in chunks if c.additional_kwargs.get("reasoning_content")]) >= 2  # streamed as it comes
        assert {"type": "reasoning", "reasoning": reasoning} in message.content_blocks
        question = ChatMessage(role=MessageRole.USER, content="Why is the sky blue?")
        response = OptimumNvidiaLLM(**options).chat([question], ignore_eos=True)
        thinking = [b for b in response.message.blocks if isinstance(b, ThinkingBlock)]
        assert thinking and thinking[0].content == reasoning  # the same greedy reply, the same thoughts
    finally:
        chat.get_llm().shutdown()


def test_cut_off_constrained_output_is_a_length_error_in_both_plugins(model_dirs):
    from pydantic import BaseModel

    from langchain_core.tools import tool
    from langchain_optimum_nvidia import ChatOptimumNvidia
    from llamaindex_optimum_nvidia import OptimumNvidiaLLM
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool
    from optimum_nvidia_core.outputs import OutputCutOffError

    class City(BaseModel):
        name: str
        country: str

    options = {**_options(model_dirs("qwen2.5")), "max_tokens": 3}
    chat = ChatOptimumNvidia(**options)
    try:
        with pytest.raises(OutputCutOffError, match=r"structured output was cut off at max_tokens=3.*raise max_"):
            chat.with_structured_output(City).invoke("Paris?")
        with pytest.raises(OutputCutOffError, match=r"forced tool call was cut off at max_tokens=3"):
            chat.bind_tools([tool(get_weather)], tool_choice="any").invoke("Weather?")
        llm = OptimumNvidiaLLM(**options)
        with pytest.raises(OutputCutOffError, match=r"forced tool call was cut off at max_tokens=3"):
            llm.chat_with_tools([FunctionTool.from_defaults(fn=get_weather)], user_msg="Weather?", tool_required=True)
        with pytest.raises(OutputCutOffError, match="max_tokens=3"):
            llm.structured_predict(City, PromptTemplate("Paris?"))
    finally:
        chat.get_llm().shutdown()
