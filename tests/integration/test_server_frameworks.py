"""LangChain's ChatOpenAI and LlamaIndex's OpenAILike pointed at `optimum-nvidia serve` (live, 127.0.0.1)."""
from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from live_server import LiveServer
from optimum_nvidia_core.hub import DEFAULT_MODEL
from optimum_nvidia_core.server.local_engine import LocalEngine
from langchain_tools import City, get_weather

KEY = "sk-frameworks"


@pytest.fixture(scope="module")
def server():
    with LiveServer(LocalEngine(DEFAULT_MODEL, device="cpu", max_batch_size=32), api_key=KEY) as live:
        yield live


@pytest.fixture(scope="module")
def chat(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.base_url + "/v1", api_key=KEY, model=DEFAULT_MODEL, temperature=0,
                      max_tokens=48, frequency_penalty=0.6, max_retries=0)


def test_chat_openai_invoke_and_stream(chat):
    answer = chat.invoke("What is the capital of France? Answer in one word.")
    assert isinstance(answer, AIMessage) and answer.content
    assert answer.usage_metadata["output_tokens"] > 0
    chunks = list(chat.stream("Name a color."))
    assert len(chunks) > 1 and "".join(c.content for c in chunks)


async def test_chat_openai_async_batch(chat):
    answers = await chat.abatch(["Say hi.", "Say bye."])
    assert all(a.content for a in answers)


def test_chat_openai_bind_tools_round_trip(chat):
    with_tools = chat.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("What is the weather in Paris?")
    reply = with_tools.invoke([question])
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    final = chat.bind_tools([get_weather]).invoke([question, reply, result])
    assert final.content or final.tool_calls


def test_chat_openai_with_structured_output(chat):
    for method in ("json_schema", "function_calling"):
        city = chat.with_structured_output(City, method=method).invoke(
            "Paris is the capital of France. Extract the city and its country.")
        assert isinstance(city, City) and city.name, method


def test_llamaindex_openai_like(server):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model=DEFAULT_MODEL, api_base=server.base_url + "/v1", api_key=KEY, is_chat_model=True,
                     max_tokens=32, temperature=0, context_window=8192, max_retries=0)
    assert llm.complete("The capital of France is").text
    reply = llm.chat([ChatMessage(role="user", content="Name a fruit.")])
    assert reply.message.content
    streamed = "".join(r.delta or "" for r in llm.stream_chat([ChatMessage(role="user", content="Name a fruit.")]))
    assert streamed == reply.message.content
    completion_llm = OpenAILike(model=DEFAULT_MODEL, api_base=server.base_url + "/v1", api_key=KEY,
                                is_chat_model=False, max_tokens=8, temperature=0, max_retries=0)
    assert completion_llm.complete("Once upon a time").text
