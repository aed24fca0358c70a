"""The fallback for chat templates without tool support (SmolLM2's ChatML, Llama 2, DeepSeek-R1 distills).

It follows the Hermes/Qwen convention, which small instruct models follow best:
- a system section lists the tools as JSON schemas inside ``<tools></tools>`` and asks for
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
- earlier assistant tool calls are written back in that same form;
- tool results become a user turn of ``<tool_response>...</tool_response>`` blocks (every template accepts "user").
When the template demands strict user/assistant alternation (Llama 2), consecutive turns of one role (a tool
result followed by the user's next question) are merged into one turn.
"""
from __future__ import annotations

import json
from typing import Any

from .hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, HermesFormat

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class FallbackFormat(HermesFormat):
    name = "fallback"
    native = False

    def conversation(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], instruction: str,
                     alternate: bool) -> list[dict[str, Any]]:
        """Plain role/content turns any template takes: tools in the system turn, calls and results as text."""
        out: list[dict[str, Any]] = []
        previous = None  # the role of the previous message as given
        for m in messages:
            turn = _plain_turn(m)
            same_turn = out and out[-1]["role"] == turn["role"] != "system"
            if same_turn and (alternate or previous == m["role"] == "tool"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + turn["content"]}
            else:
                out.append(turn)
            previous = m["role"]
        if tools:
            section = tools_prompt(tools) + (f"\n\n{instruction}" if instruction else "")
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
            else:
                out.insert(0, {"role": "system", "content": section})
        return out


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system section that teaches a template without tool support the <tool_call> convention."""
    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def _plain_turn(m: dict[str, Any]) -> dict[str, Any]:
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    content = m["content"]
    if m.get("tool_calls"):
        calls = [_call_text(c["function"]) for c in m["tool_calls"]]
        content = "\n".join(([content] if content else []) + calls)
    return {"role": m["role"], "content": content}


def _call_text(fn: dict[str, Any]) -> str:
    payload = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{payload}\n{TOOL_CALL_CLOSE}"
