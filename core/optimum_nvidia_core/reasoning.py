"""Reasoning output: the ``<think>...</think>`` part of a reply (DeepSeek-R1 distills), apart from the answer.

``ReasoningSplitter`` reads one completion's text as it streams and says which part is reasoning and which is
content. A tag split across deltas is held back until it is whole. A template whose generation prompt already
opens ``<think>`` starts the reply inside the thinking; otherwise a reply may open it itself.
"""
from __future__ import annotations

from typing import Any

from .text_checks import partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def has_reasoning(template: str | None, tokenizer: Any) -> bool:
    """Whether the family writes <think> blocks: its template handles them or its tokenizer has the tags."""
    vocab = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    return THINK_CLOSE in (template or "") or (THINK_OPEN in vocab and THINK_CLOSE in vocab)


def opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt leaves the model inside a <think> block."""
    return prompt.rstrip().endswith(THINK_OPEN)


class ReasoningSplitter:
    """States: "start" (a <think> may open), "thinking", "after" (skip the blank lines after </think>),
    "content"."""

    def __init__(self, enabled: bool, thinking: bool):
        self.state = "thinking" if thinking else ("start" if enabled else "content")
        self.buffer = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) released by this piece of text; ``final`` releases everything."""
        if self.state == "content":
            return "", text
        self.buffer += text
        reasoning, content = "", ""
        if self.state == "start":
            head = self.buffer.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.buffer = "thinking", head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head) and not final:
                return "", ""  # maybe a <think> still arriving
            else:
                self.state, content, self.buffer = "content", self.buffer, ""
        if self.state == "thinking":
            reasoning = self._thinking(final)
        if self.state == "after":
            rest, self.buffer = self.buffer.lstrip(), ""
            if rest:
                self.state, content = "content", rest
        return reasoning, content

    def _thinking(self, final: bool) -> str:
        end = self.buffer.find(THINK_CLOSE)
        if end >= 0:
            reasoning, self.buffer = self.buffer[:end], self.buffer[end + len(THINK_CLOSE):]
            self.state = "after"
            return reasoning
        keep = 0 if final else partial_suffix(self.buffer, (THINK_CLOSE,))
        reasoning, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return reasoning

