"""Turns a chat request's raw deltas into content deltas plus parsed tool calls on the last delta.

Content streams as it comes. From the first sign of a tool call (a start marker such as ``<tool_call>``, possibly
split across deltas, or a reply that opens with ``{``) the text is held back; at the end it is parsed by
``tool_calls.parse_tool_calls``. Held-back text that turns out not to be a call is released, so nothing is lost.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .tool_calls import parse_tool_calls
from .outputs import RequestOutput
from .request_stream import RequestStream

TOOL_CALL_MARKERS = ("<tool_call>", "<|python_tag|>")


class ToolCallStream:
    def __init__(self, source: RequestStream, tools: list[dict[str, Any]], forced: bool = False):
        self.source = source
        self.tools = tools
        self.text = ""  # everything generated so far
        self.emitted = 0  # chars of self.text already sent as content
        self.holding = forced  # a (possible) tool call started: hold everything from here

    def feed(self, delta: RequestOutput) -> list[RequestOutput]:
        if not self.tools:
            return [delta]
        self.text += delta.text
        if delta.finished:
            return [self._finish(delta)]
        release = self._releasable()
        return [dataclasses.replace(delta, text=release)] if release else []

    def _releasable(self) -> str:
        """Content that can no longer turn out to be part of a tool call."""
        if self.holding:
            return ""
        if self.text.lstrip().startswith("{"):  # a bare JSON call (Llama 3 style) may be coming
            self.holding = True
            return ""
        starts = [i for marker in TOOL_CALL_MARKERS if (i := self.text.find(marker, self.emitted)) >= 0]
        if starts:
            self.holding = True
            end = min(starts)
        else:
            end = max(len(self.text) - _marker_prefix_len(self.text), self.emitted)
        release, self.emitted = self.text[self.emitted:end], end
        return release

    def _finish(self, delta: RequestOutput) -> RequestOutput:
        content, calls = parse_tool_calls(self.text, self.tools)
        if calls:
            rest = content[self.emitted:] if content.startswith(self.text[:self.emitted]) else ""
            return dataclasses.replace(delta, text=rest, tool_calls=calls, finish_reason="tool_calls")
        return dataclasses.replace(delta, text=self.text[self.emitted:])


def _marker_prefix_len(text: str) -> int:
    """Length of the longest suffix of ``text`` that could begin a tool-call marker."""
    best = 0
    for marker in TOOL_CALL_MARKERS:
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                best = max(best, k)
                break
    return best
