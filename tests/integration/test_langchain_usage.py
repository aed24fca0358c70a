"""The LangChain plugin in real use on SmolLM2-135M-Instruct (CPU): an LCEL chain streamed, a LangGraph agent
loop with one tool, structured output, and the text-completion LLM class."""
from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_optimum_nvidia import ChatOptimumNvidia, OptimumNvidia
from optimum_nvidia_core.hub import DEFAULT_MODEL
from langchain_tools import City, get_weather

# Greedy decoding of a 135M model loops on repeated phrases; a frequency penalty (output tokens only) stops that.
OPTIONS = {"model": DEFAULT_MODEL, "temperature": 0, "frequency_penalty": 0.6, "device": "cpu"}


@pytest.fixture(scope="module")
def chat():
    return ChatOptimumNvidia(max_tokens=40, **OPTIONS)


def test_lcel_chain_streams_token_by_token(chat):
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a helpful assistant. Answer in one sentence."), ("human", "{question}")]
    )
    chain = prompt | chat | StrOutputParser()
    pieces = list(chain.stream({"question": "What is the capital of France?"}))
    assert len([p for p in pieces if p]) >= 3
    answer = "".join(pieces)
    assert "Paris" in answer
    assert answer == chain.invoke({"question": "What is the capital of France?"})


async def test_lcel_chain_astreams(chat):
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | chat | StrOutputParser()
    pieces = [p async for p in chain.astream({"question": "What is the capital of France?"})]
    assert len(pieces) >= 3 and "Paris" in "".join(pieces)


def _agent(chat, tools):
    """The LangGraph agent loop: model -> tools (while it calls tools) -> model -> answer.

    The first turn is forced to call a tool (tool_choice="any"): SmolLM2-135M does not choose to call tools on its
    own, larger models do. Later turns are free, so the model answers once it has read the tool's result.
    """
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    free, forced = chat.bind_tools(tools), chat.bind_tools(tools, tool_choice="any")

    def call_model(state):
        first_turn = not any(isinstance(m, ToolMessage) for m in state["messages"])
        return {"messages": [(forced if first_turn else free).invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    return graph.compile()


def test_langgraph_agent_loop_calls_the_tool_and_uses_its_result(chat):
    agent = _agent(chat, [get_weather])
    system = SystemMessage("You are a helpful assistant. Use the tools, then answer the user's question in one "
                           "short sentence.")
    result = agent.invoke({"messages": [system, HumanMessage("What is the weather in Paris?")]},
                          {"recursion_limit": 6})
    messages = result["messages"]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls and calls[0]["name"] == "get_weather" and "Paris" in calls[0]["args"]["city"]
    tool_results = [m for m in messages if isinstance(m, ToolMessage)]
    assert tool_results and tool_results[0].tool_call_id == calls[0]["id"]
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert "sunny" in final.content.lower()  # the answer uses the tool's result


def test_structured_output_fills_the_schema(chat):
    structured = chat.with_structured_output(City)
    city = structured.invoke("Paris is the capital of France. Which city and country is this about?")
    assert isinstance(city, City)
    assert "paris" in city.name.lower() and "france" in city.country.lower()


def test_forced_tool_call_picks_arguments_from_the_question(chat):
    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Is it raining in Tokyo?")
    assert message.tool_calls[0]["name"] == "get_weather"
    assert "Tokyo" in message.tool_calls[0]["args"]["city"]


def test_text_llm_invoke_stream_batch():
    llm = OptimumNvidia(max_tokens=12, **OPTIONS)
    prompt = "The capital of France is"
    text = llm.invoke(prompt)
    assert "Paris" in text
    pieces = list(llm.stream(prompt))
    assert len(pieces) >= 3 and "".join(pieces) == text
    batch = llm.batch([prompt, "The capital of Germany is"])
    assert batch[0] == text and "Berlin" in batch[1]
