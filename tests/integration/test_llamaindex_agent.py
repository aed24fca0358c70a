"""Tools with the real SmolLM2 (CPU): a FunctionAgent calls a tool and uses its result; forced calls and
structured output are constrained by the core's grammar, so they always parse into valid objects."""
from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import AgentStream, FunctionAgent, ToolCallResult
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from llamaindex_optimum_nvidia import OptimumNvidiaLLM


@pytest.fixture(scope="module")
def llm():
    return OptimumNvidiaLLM(temperature=0.0, max_tokens=48, device="cpu")


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(description="The city's name")
    country: str = Field(description="The country the city is in")


def secret_code_tool(calls: list[str]) -> FunctionTool:
    def get_secret_code(person: str) -> str:
        """Look up the secret code of a person."""
        calls.append(person)
        return f"The secret code of {person} is 7391."

    return FunctionTool.from_defaults(fn=get_secret_code)


async def test_function_agent_calls_a_tool_and_uses_its_result(llm):
    calls: list[str] = []
    agent = FunctionAgent(
        tools=[secret_code_tool(calls)], llm=llm,
        system_prompt="You answer questions. Use the tool results you are given.",
        initial_tool_choice="get_secret_code",  # the first step must call the tool (grammar-constrained)
    )
    handler = agent.run(user_msg="What is the secret code of Alice?")
    tool_results, deltas = [], []
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            tool_results.append(event)
        elif isinstance(event, AgentStream):
            deltas.append(event.delta)
    response = await handler
    assert calls == ["Alice"]
    assert tool_results and "7391" in str(tool_results[0].tool_output)
    assert "7391" in str(response)  # the answer uses the tool's result
    assert len([d for d in deltas if d]) > 1  # the final answer was streamed


async def test_achat_with_tools_forced_call_parses(llm):
    calls: list[str] = []
    tool = secret_code_tool(calls)
    response = await llm.achat_with_tools([tool], user_msg="Find Bob's secret code.", tool_required=True)
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "get_secret_code"
    assert isinstance(selection.tool_kwargs["person"], str)
    assert response.additional_kwargs["finish_reason"] == "tool_calls"


def test_predict_and_call_runs_the_tool(llm):
    calls: list[str] = []
    out = llm.predict_and_call([secret_code_tool(calls)], user_msg="What is Carol's secret code?", tool_required=True)
    assert len(calls) == 1 and "7391" in out.response


def test_structured_predict_gives_a_valid_object(llm):
    city = llm.structured_predict(City, PromptTemplate("Name the capital of {country}."), country="France")
    assert isinstance(city, City)
    assert city.name and city.country


async def test_as_structured_llm_gives_a_valid_object(llm):
    from llama_index.core.base.llms.types import ChatMessage

    structured = llm.as_structured_llm(City)
    response = await structured.achat([ChatMessage(role="user", content="Tell me about Berlin, Germany.")])
    assert isinstance(response.raw, City)
    assert City.model_validate_json(response.message.content) == response.raw
