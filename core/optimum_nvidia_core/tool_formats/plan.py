"""The tool plan: built once per chat request from the raw tools and tool_choice, read by the prompt, the
grammar and the parser (so tool_choice is interpreted in one place and tools are validated once)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..outputs import ToolCall
from ..tool_calls import ChoiceMode, normalize_tools, parse_tool_choice
from .base import ToolFormat


@dataclass(frozen=True)
class ToolPlan:
    format: ToolFormat
    tools: list[dict[str, Any]] = field(default_factory=list)  # validated specs the prompt offers
    mode: ChoiceMode = "auto"
    chosen: list[dict[str, Any]] = field(default_factory=list)  # function specs a forced call may use
    reasoning: bool = False  # the family writes <think>...</think> before its answer
    thinking_open: bool = False  # the prompt leaves the model inside <think> (its reply starts with thoughts)
    marker_ids: dict[int, str] = field(default_factory=dict)  # token id -> marker text, restored when skipped
    single_call: bool = False  # the caller turned parallel calls off: a forced reply holds exactly one

    @classmethod
    def build(cls, fmt: ToolFormat, tools: list[dict[str, Any]] | None, tool_choice: Any,
              **details: Any) -> "ToolPlan":
        specs = normalize_tools(tools)
        mode, name = parse_tool_choice(tool_choice, [t["function"]["name"] for t in specs])
        if mode == "none":
            specs = []
        functions = [t["function"] for t in specs]
        chosen = [f for f in functions if f["name"] == name] if mode == "named" else functions
        return cls(format=fmt, tools=specs, mode=mode, chosen=chosen, **details)

    def replace(self, **changes: Any) -> "ToolPlan":
        return dataclasses.replace(self, **changes)

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named") and bool(self.chosen)

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def forced_schema(self) -> dict[str, Any]:
        """The JSON schema a forced reply is generated under, in the family's native shape."""
        return self.format.forced_schema(self.chosen, one=self.single_call or self.mode == "named")

    def instruction(self) -> str:
        """What the fallback's tools section says about tool_choice (the grammar is what enforces it)."""
        if self.mode == "required":
            return "You must call at least one function."
        if self.mode == "named":
            return f"Call the function {self.chosen[0]['name']!r}."
        return ""

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of one complete completion's text (the part after any reasoning)."""
        if not self.tools:
            return text, []
        if self.forced:
            text = self.format.wrap_forced(text)
        return self.format.parse(text, self.names)
