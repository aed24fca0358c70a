"""A LangGraph tool-calling agent on optimum-nvidia: the model calls a tool, reads its result, answers. Offline.

    python examples/langchain_agent.py
    python examples/langchain_agent.py "What is the weather in Oslo?"

The graph is the classic agent loop: model -> (tool calls?) -> tools -> model -> ... -> answer. The tools are
passed to the model's chat template (SmolLM2's plain ChatML gets the Hermes-style <tools> section from the
core's chat.py) and every tool call is parsed into AIMessage.tool_calls with an id. The first turn must call a
tool (tool_choice="any"; its arguments are generated under a grammar built from the tool's JSON schema), because
SmolLM2-135M does not choose to call tools on its own; with a larger model pass --let-model-choose.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langgraph.graph import START, MessagesState, StateGraph  # noqa: E402
from langgraph.prebuilt import ToolNode, tools_condition  # noqa: E402

from langchain_optimum_nvidia import ChatOptimumNvidia  # noqa: E402
from optimum_nvidia_core import DEFAULT_MODEL  # noqa: E402

# Small models answer in a sentence after a tool result when told so (else they may echo the result's markup).
SYSTEM_PROMPT = "You are a helpful assistant. Use the tools, then answer the user's question in one short sentence."
WEATHER = {"paris": "sunny, 24 °C", "oslo": "light snow, -3 °C", "tokyo": "rain, 17 °C"}


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"The weather in {city} is {WEATHER.get(city.strip().lower(), 'cloudy, 15 °C')}."


def build_agent(chat: ChatOptimumNvidia, tools: list, force_first_call: bool = False):
    """A compiled LangGraph agent: {"messages": [...]} in, the whole conversation out."""
    free = chat.bind_tools(tools)
    forced = chat.bind_tools(tools, tool_choice="any")

    def call_model(state: MessagesState) -> dict:
        # The first turn may be forced to call a tool; once a tool has answered, the model answers freely.
        first_turn = not any(isinstance(m, ToolMessage) for m in state["messages"])
        model = forced if force_first_call and first_turn else free
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)  # tool calls -> "tools", else the end
    graph.add_edge("tools", "model")
    return graph.compile()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", default="What is the weather in Paris?")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--let-model-choose", action="store_true",
                        help="do not force the first turn to call a tool (for models that call tools on their own)")
    args = parser.parse_args(argv)

    chat = ChatOptimumNvidia(model=args.model, temperature=0, max_tokens=args.max_tokens, device=args.device)
    agent = build_agent(chat, [get_weather], force_first_call=not args.let_model_choose)
    print(f"user: {args.question}")
    messages = [SystemMessage(SYSTEM_PROMPT), HumanMessage(args.question)]
    for step in agent.stream({"messages": messages}, stream_mode="updates"):
        for node, update in step.items():
            for message in update["messages"]:
                if isinstance(message, AIMessage) and message.tool_calls:
                    for call in message.tool_calls:
                        print(f"{node}: calls {call['name']}({call['args']})  [id {call['id']}]")
                else:
                    print(f"{node}: {message.content}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
