"""Chat messages (+ tools, tool_choice, structured output) to a prompt and the SamplingParams that serve it.

The one place that decides how a chat request is generated; both plugins reach it through ``LLM.chat_stream``.
A forced tool call (``tool_choice`` "any"/"required"/a tool's name) appends the template's call opener to the
prompt and constrains the rest to a JSON object that validates against the chosen tool's schema.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .chat import ChatFormatter, forced_call_prefix, normalize_tools, tool_call_schema
from .sampling_params import SamplingParams

AUTO_CHOICES = (None, "auto")


class ChatRequestBuilder:
    def __init__(self, tokenizer: Any, model_dir: Path | None = None):
        self.tokenizer = tokenizer
        self.formatter = ChatFormatter(tokenizer, model_dir)

    def prepare(self, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
                tool_choice: str | None = None) -> tuple[list[int], SamplingParams, bool]:
        """Returns (prompt token ids, params to generate with, whether a tool call is forced)."""
        tools = normalize_tools(tools) if tools else []
        if tool_choice == "none":
            tools = []
        forced = bool(tools) and tool_choice not in AUTO_CHOICES
        if tool_choice not in AUTO_CHOICES and tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs tools; pass tools=[...] or tool_choice=None")
        text = self.formatter.render(messages, tools or None, tool_choice=tool_choice)
        if forced:
            text += forced_call_prefix(self.formatter)
            params = params.model_copy(update={"guided_json": tool_call_schema(tools, tool_choice)})
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, params, forced
