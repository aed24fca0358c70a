"""Hermes / Qwen2.5: calls as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks.

The templates of Qwen2.5, Hermes 2 Pro and Hermes 3 render tools, calls and ``<tool_response>`` results
themselves. A reply may hold text around the blocks and several blocks (parallel calls); a small model sometimes
drops the tags and answers with the bare JSON object, which is read as a call too.
"""
from __future__ import annotations

import re

from ..outputs import ToolCall
from .base import ToolFormat, calls_in

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)


class HermesFormat(ToolFormat):
    name = "hermes"
    markers = (TOOL_CALL_OPEN,)
    bare_json = True
    forced_prefix = TOOL_CALL_OPEN + "\n"
    forced_suffix = "\n" + TOOL_CALL_CLOSE

    def parse(self, text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []
        pieces, last = [], 0
        for block in _BLOCK.finditer(text):
            found = calls_in(block.group(1), names, self.new_call_id)
            if found:
                calls += found
                pieces.append(text[last:block.start()])
                last = block.end()
        if calls:
            return ("".join(pieces) + text[last:]).strip(), calls
        found = calls_in(_unfenced(text), names, self.new_call_id)
        return ("", found) if found else (text, [])


def _unfenced(text: str) -> str:
    """The reply without a ```json fence around it."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    return fence.group(1) if fence else body
