"""LangChain tools and tool_choice values, turned into what the core's chat template and grammar take."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.utils.function_calling import convert_to_openai_tool

# LangChain and OpenAI spell "the model must call some tool" several ways.
_MUST_CALL = ("any", "required")


def convert_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-style tool specs ({"type": "function", "function": {name, description, parameters}})."""
    return [convert_to_openai_tool(tool) for tool in tools]


def normalize_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> str | None:
    """One of None ("auto": the model decides), "none", "required", or the name of the tool to call.

    Accepts LangChain's values ("any", a tool name, True) and OpenAI's ("auto", "none", "required",
    {"type": "function", "function": {"name": ...}}). Raises ValueError naming the problem otherwise.
    """
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None or tool_choice == "auto" or tool_choice is False:
        return None
    if tool_choice is True or tool_choice in _MUST_CALL:
        if not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs at least one tool; pass tools to bind_tools")
        return "required"
    if tool_choice == "none":
        return "none"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if not isinstance(name, str):
            raise ValueError(
                f"tool_choice {tool_choice!r} names no tool; use {{'type': 'function', 'function': {{'name': ...}}}}"
            )
        tool_choice = name
    if isinstance(tool_choice, str):
        if tool_choice not in names:
            raise ValueError(
                f"tool_choice {tool_choice!r} is not one of the bound tools {names}; "
                "pass one of those names, 'auto', 'none', 'any' or 'required'"
            )
        return tool_choice
    raise ValueError(
        f"tool_choice must be a tool name, 'auto', 'none', 'any', 'required' or a bool, got {tool_choice!r}"
    )
