"""Llama 3.1 / 3.2 / 3.3: a call is the whole reply, ``{"name": ..., "parameters": {...}}``.

The template asks for "parameters" (not "arguments") and renders one call per assistant turn (it raises on two),
so a forced call is one object. With built-in tools the model opens the call with the ``<|python_tag|>`` token
and ends the turn with ``<|eom_id|>``; both are read here, whether special tokens are shown or not.
"""
from __future__ import annotations

from typing import Any

from ..outputs import ToolCall
from .base import ToolFormat, calls_in
from .hermes import _unfenced

PYTHON_TAG = "<|python_tag|>"


class Llama3Format(ToolFormat):
    name = "llama3_json"
    markers = (PYTHON_TAG,)
    bare_json = True
    arguments_key = "parameters"
    extra_end_of_turn = ("<|eom_id|>", "<|eot_id|>")

    def parse(self, text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
        body = text.strip()
        before, tag, after = body.partition(PYTHON_TAG)
        payload = after if tag else body
        found = calls_in(_unfenced(payload), names, self.new_call_id)
        if found:
            return (before.strip() if tag else ""), found
        return text, []

    def history(self, conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One call per assistant turn, as the template demands: parallel calls from other models' history
        become consecutive (call, its results) pairs."""
        out: list[dict[str, Any]] = []
        i = 0
        while i < len(conversation):
            m = conversation[i]
            calls = m.get("tool_calls") or []
            i += 1
            if len(calls) <= 1:
                out.append(m)
                continue
            results = []
            while i < len(conversation) and conversation[i]["role"] == "tool":
                results.append(conversation[i])
                i += 1
            for k, call in enumerate(calls):
                out.append({**m, "content": m["content"] if k == 0 else "", "tool_calls": [call]})
                out += [r for r in results if r.get("tool_call_id") == call["id"]]
            out += [r for r in results if r.get("tool_call_id") not in {c["id"] for c in calls}]
        return out
