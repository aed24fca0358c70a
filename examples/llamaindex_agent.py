"""A LlamaIndex FunctionAgent on Optimum-NVIDIA: the model calls a Python tool and answers from its result.

    python examples/llamaindex_agent.py

The first step forces a call to the tool (initial_tool_choice): the core constrains the model's reply to a JSON
call that matches the tool's schema, so even a small model calls it correctly. The answer streams as it is made.
"""
from __future__ import annotations

import asyncio

from llama_index.core.agent.workflow import AgentStream, FunctionAgent, ToolCallResult

from llamaindex_optimum_nvidia import OptimumNvidiaLLM

STOCK = {"apples": 42, "pears": 7, "plums": 0}


def count_stock(fruit: str) -> str:
    """How many of a fruit are in stock."""
    count = STOCK.get(fruit.lower().rstrip("s") + "s", 0)
    return f"There are {count} {fruit} in stock."


async def run(question: str, max_tokens: int, device: str) -> str:
    agent = FunctionAgent(
        tools=[count_stock],
        llm=OptimumNvidiaLLM(temperature=0.0, max_tokens=max_tokens, device=device),
        system_prompt="You are a shop assistant. Answer with the numbers the tools give you.",
        initial_tool_choice="count_stock",
    )
    handler = agent.run(user_msg=question)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            print(f"[tool] {event.tool_name}({event.tool_kwargs}) -> {event.tool_output}")
        elif isinstance(event, AgentStream):
            print(event.delta, end="", flush=True)
    print()
    return str(await handler)


def main(question: str = "How many apples are in stock?", max_tokens: int = 64, device: str = "auto") -> str:
    return asyncio.run(run(question, max_tokens, device))


if __name__ == "__main__":
    main()
