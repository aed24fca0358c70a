"""Hermes / Qwen2.5: calls as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks.

The templates of Qwen2.5, Hermes 2 Pro and Hermes 3 render tools, calls and ``<tool_response>`` results
themselves. A reply may hold text around the blocks and several blocks (parallel calls); a small model sometimes
drops the tags and answers with the bare JSON object, which is read as a call too. A piece between tags that is
not a valid call of a known tool stays in the content, so nothing is lost.
"""
from __future__ import annotations

import re

from ..outputs import ToolCall
from .base import ToolFormat, calls_in

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TAG = re.compile(r"</?tool_call>")


class HermesFormat(ToolFormat):
    name = "hermes"
    markers = (TOOL_CALL_OPEN,)
    bare_json = True
    forced_prefix = TOOL_CALL_OPEN + "\n"
    forced_suffix = "\n" + TOOL_CALL_CLOSE

    def parse(self, text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
        if TOOL_CALL_OPEN not in text:
            found = calls_in(_unfenced(text), names, self.new_call_id)
            return ("", found) if found else (text, [])
        calls: list[ToolCall] = []
        content: list[str] = []
        # Between the tags, a piece is calls or it is content (Hermes 2 Pro's template writes a second call of a
        # turn without its own opening tag; the closing tag of the last call may be cut off).
        for piece in _TAG.split(text):
            found = calls_in(piece, names, self.new_call_id)
            if found:
                calls += found
            elif piece.strip():
                content.append(piece.strip())
        if not calls:
            return text, []
        return "\n".join(content), calls


def _unfenced(text: str) -> str:
    """The reply without a ```json fence around it."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    return fence.group(1) if fence else body
