"""A chat request's raw deltas -> content deltas, reasoning deltas and, at the end of each completion, its calls.

Each of the n completions is read on its own (by ``delta.index``). Per completion: the family's call openers that
are special tokens are put back into the text from their token ids (so parsing does not depend on
skip_special_tokens); a ``<think>`` part streams as ``reasoning``; content streams as it comes until the first
sign of a tool call (a marker such as ``<tool_call>``, possibly split across deltas, or a reply that opens with
``{`` in families that write bare JSON); from there it is held back and parsed by the plan when the completion
ends. Held-back text that is not a call is released, so nothing is lost, and the token ids and logprobs of held
deltas travel with the next delta that goes out, so a whole result has all of them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .outputs import RequestOutput
from .reasoning import ReasoningSplitter
from .text_checks import partial_suffix
from .tool_formats import ToolPlan


class _Completion:
    def __init__(self, plan: ToolPlan):
        self.reasoning = ReasoningSplitter(plan.reasoning, plan.thinking_open)
        self.content = ""  # the reply after its reasoning, so far
        self.emitted = 0  # chars of self.content already sent
        self.holding = plan.forced  # a (possible) tool call started: hold everything from here
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = None
        self.restored: list[str] = []  # openers put back from token ids (their text was skipped)

    def keep(self, delta: RequestOutput) -> None:
        self.token_ids += delta.token_ids
        if delta.logprobs:
            self.logprobs = (self.logprobs or []) + delta.logprobs

    def take(self) -> dict[str, Any]:
        out = {"token_ids": self.token_ids, "logprobs": self.logprobs}
        self.token_ids, self.logprobs = [], None
        return out


class ToolCallStream:
    def __init__(self, source: Any, plan: ToolPlan):
        self.source = source
        self.plan = plan
        self._completions: dict[int, _Completion] = {}

    def feed(self, delta: RequestOutput) -> list[RequestOutput]:
        if delta.error is not None or delta.finish_reason == "error":
            return [delta]
        c = self._completions.setdefault(delta.index, _Completion(self.plan))
        c.keep(delta)
        ended = delta.finish_reason is not None
        reasoning, content = c.reasoning.feed(self._text(delta, c), final=ended)
        c.content += content
        if ended:
            return [self._finish(c, delta, reasoning)]
        text = self._releasable(c)
        if not text and not reasoning:
            return []
        return [dataclasses.replace(delta, text=text, reasoning=reasoning or None, **c.take())]

    def _text(self, delta: RequestOutput, c: _Completion) -> str:
        """The delta's text with call openers put back where special tokens were skipped."""
        text = delta.text
        for token in delta.token_ids:
            marker = self.plan.marker_ids.get(token)
            if marker is not None and marker not in text:
                text = marker + text
                c.restored.append(marker)
        return text

    def _releasable(self, c: _Completion) -> str:
        """Content that can no longer turn out to be part of a tool call."""
        if not self.plan.tools:
            end = len(c.content)
        elif c.holding:
            return ""
        elif self.plan.format.bare_json and c.content.lstrip().startswith("{"):
            c.holding = True  # a bare JSON call (Llama 3 style) may be coming
            return ""
        else:
            markers = self.plan.format.markers
            starts = [i for m in markers if (i := c.content.find(m, c.emitted)) >= 0]
            c.holding = bool(starts)
            end = min(starts) if starts else max(len(c.content) - partial_suffix(c.content, markers), c.emitted)
        release, c.emitted = c.content[c.emitted:end], end
        return release

    def _finish(self, c: _Completion, delta: RequestOutput, reasoning: str) -> RequestOutput:
        shown = c.content[:c.emitted]
        content, calls = self.plan.parse(c.content)
        update: dict[str, Any] = {"reasoning": reasoning or None, **c.take()}
        if calls:
            rest = content[len(shown):] if content.startswith(shown) else ""
            return dataclasses.replace(delta, text=rest, tool_calls=calls, finish_reason="tool_calls", **update)
        rest = c.content[c.emitted:]
        for marker in c.restored:  # not a call after all: the text as the caller's skip_special_tokens shows it
            rest = rest.replace(marker, "", 1)
        return dataclasses.replace(delta, text=rest, **update)
