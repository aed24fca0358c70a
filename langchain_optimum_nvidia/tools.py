"""LangChain tools and tool_choice values, turned into what the core's tool plan takes."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.utils.function_calling import convert_to_openai_tool

from optimum_nvidia_core.tool_calls import parse_tool_choice


def convert_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-style tool specs ({"type": "function", "function": {name, description, parameters}})."""
    return [convert_to_openai_tool(tool) for tool in tools]


def normalize_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> str | None:
    """One of None ("auto": the model decides), "none", "required", or the name of the tool to call.

    Accepts LangChain's values ("any", a tool name, True) and OpenAI's ("auto", "none", "required",
    {"type": "function", "function": {"name": ...}}); the core's ``parse_tool_choice`` is the one reader, and its
    ValueError names the problem.
    """
    mode, name = parse_tool_choice(tool_choice, [t["function"]["name"] for t in tools])
    return {"auto": None, "none": "none", "required": "required", "named": name}[mode]
