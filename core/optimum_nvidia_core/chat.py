"""Chat messages (+ tools) to a prompt through the model's own chat template.

Both plugins and ``LLM.chat`` go through here; nothing else renders chat templates. Tool specs, forced-call
schemas and parsing generated tool calls live in ``tool_calls.py``.

Messages are OpenAI-style dicts: ``{"role": "system" | "user" | "assistant" | "tool", "content": str or a list of
{"type": "text", "text": ...} parts}``; assistant messages may carry ``tool_calls`` ([{"id", "type": "function",
"function": {"name", "arguments"}}], arguments a JSON string or a dict), tool messages ``tool_call_id`` / ``name``.

Templates that read ``tools`` (Llama 3.1+, Qwen2.5, Hermes) get them natively. For templates without tool support
(SmolLM2's plain ChatML) the fallback is the Hermes/Qwen convention, which small instruct models follow best:
- a system section lists the tools as JSON schemas inside ``<tools></tools>`` and asks for
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
- earlier assistant tool calls are written back in that same form;
- tool results become a user turn of ``<tool_response>...</tool_response>`` blocks (every template accepts "user";
  consecutive results share one turn).
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .text_checks import check_unicode
from .tool_calls import (
    AUTO_CHOICES,
    FORCING_CHOICES,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    choice_name,
    new_call_id,
    normalize_tools,
)

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
TEXT_PART_TYPES = ("text", "input_text")

FALLBACK_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


# ---- messages ---------------------------------------------------------------------------------------------------
def normalize_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated copies: roles checked, content as one string, tool calls as {"id", "type", "function": {"name",
    "arguments": dict}} (the form chat templates expect). Raises ValueError naming the message and the fix."""
    if isinstance(messages, Mapping):
        raise TypeError("messages must be a list of messages, got one dict; wrap it in a list: [message]")
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}"
                        + ("; pass list(messages)" if isinstance(messages, Iterator) else ""))
    if not messages:
        raise ValueError("messages is empty; pass at least one message, e.g. [{'role': 'user', 'content': 'Hi'}]")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(i: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
    role = ROLE_ALIASES.get(message["role"], message["role"])
    if role not in ROLES:
        raise ValueError(f"message {i} has unknown role {message['role']!r}; use one of {', '.join(ROLES)}")
    where = f"message {i} ({role})"
    out: dict[str, Any] = {"role": role, "content": _text_content(message.get("content"), where, role)}
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = [_normalize_call(c, f"{where} tool_calls[{j}]")
                             for j, c in enumerate(message["tool_calls"])]
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                out[key] = check_unicode(str(message[key]), f"{where} {key}")
    return out


def _text_content(content: Any, where: str, role: str) -> str:
    if content is None and role == "assistant":  # an assistant turn that only calls tools
        return ""
    if isinstance(content, str):
        return check_unicode(content, where)
    if isinstance(content, (list, tuple)):
        return "\n".join(_text_part(part, where) for part in content)
    raise ValueError(f"{where} has content of type {type(content).__name__}; pass a string or a list of "
                     "{'type': 'text', 'text': ...} parts")


def _text_part(part: Any, where: str) -> str:
    if isinstance(part, str):
        return check_unicode(part, where)
    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
    if kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
        raise ValueError(f"{where} has a content part of type {kind!r}; this model reads text only, so send "
                         "images, audio and files as text (e.g. a description) or use a multimodal model")
    return check_unicode(part["text"], where)


def _normalize_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be a dict like {{'id': ..., 'type': 'function', 'function': "
                         "{'name': ..., 'arguments': '{...}'}}")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} has no function name; pass {{'function': {{'name': ..., 'arguments': ...}}}}")
    args = fn.get("arguments", fn.get("args"))
    if isinstance(args, str):
        check_unicode(args, where)
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as exc:
            raise ValueError(f"{where} ({name}) has arguments that are not valid JSON ({exc}); pass a JSON "
                             "object string or a dict") from None
    args = {} if args is None else args
    if not isinstance(args, Mapping):
        raise ValueError(f"{where} ({name}) arguments must be a JSON object, got {type(args).__name__}")
    call_id = call.get("id") or new_call_id()
    return {"id": str(call_id), "type": "function", "function": {"name": name, "arguments": dict(args)}}


# ---- the formatter ----------------------------------------------------------------------------------------------
class ChatFormatter:
    """Renders messages (+ tools) through the model's chat template.

    ``chat_template`` overrides the tokenizer's; ``model_dir`` is searched for chat_template.jinja/.json when the
    tokenizer carries none.
    """

    def __init__(self, tokenizer: Any, model_dir: str | Path | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or _template_from_dir(tokenizer, model_dir)
        # The template used when tools are given (a tokenizer may keep a separate "tool_use" one).
        template = self._template(tools=[], strict=False)
        self.native_tools = template is not None and _reads_tools(template)
        # Templates of the Hermes/Qwen family (and our fallback) open calls with <tool_call>; Llama 3.x emits bare JSON.
        use_tag = not self.native_tools or TOOL_CALL_OPEN in template
        self.tool_call_prefix = TOOL_CALL_OPEN + "\n" if use_tag else ""

    def render(self, messages: list[Mapping[str, Any]], tools: list[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True, tool_choice: Any = None) -> str:
        """The prompt text. ``tool_choice`` "none" leaves the tools out; a forced choice is said in the fallback's
        instructions (the grammar, not the prompt, is what enforces it)."""
        conversation = normalize_messages(messages)
        tools = normalize_tools(tools) if tool_choice != "none" else []
        template = self._template(tools or None)
        native = _reads_tools(template)
        if not native:
            conversation = _fallback_conversation(conversation, tools, tool_choice)
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tools=(tools or None) if native else None, chat_template=template,
                add_generation_prompt=add_generation_prompt, tokenize=False, return_dict=False)
        except Exception as exc:  # jinja2 errors, the template's raise_exception(), KeyError/TypeError inside it
            if type(exc).__name__ == "TemplateSyntaxError":  # jinja2's: the template itself is broken
                raise ValueError(f"the model's chat template is not valid Jinja (line {exc.lineno}: {exc}); fix "
                                 "chat_template in the model's tokenizer_config.json or chat_template.jinja") from exc
            roles = [m["role"] for m in conversation]
            raise ValueError(
                f"the model's chat template rejected these messages (roles {roles}): {type(exc).__name__}: {exc}. "
                "Reorder them as this template expects, e.g. one system message first, then user and assistant "
                "turns alternating, ending with a user or tool turn") from exc

    def _template(self, tools: list[dict] | None, strict: bool = True) -> str | None:
        if self.chat_template is not None:
            return self.chat_template
        try:
            return self.tokenizer.get_chat_template(tools=tools)
        except ValueError:
            if not strict:
                return None
            raise ValueError("this model has no chat template (neither its tokenizer_config.json nor a "
                             "chat_template.jinja in its directory has one); add a chat_template.jinja file to the "
                             "model's directory, or call LLM.generate with a plain text prompt") from None


def _template_from_dir(tokenizer: Any, model_dir: str | Path | None) -> str | None:
    if getattr(tokenizer, "chat_template", None) or model_dir is None:
        return None
    jinja, js = Path(model_dir) / "chat_template.jinja", Path(model_dir) / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if js.is_file():
        return json.loads(js.read_text(encoding="utf-8")).get("chat_template")
    return None


@functools.lru_cache(maxsize=16)
def _reads_tools(template: str) -> bool:
    """Whether the Jinja template uses the ``tools`` variable (else tools passed to it would be silently dropped)."""
    import jinja2
    from jinja2 import meta

    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        return "tools" in meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:  # e.g. transformers' own {% generation %} tag: fall back to a word search
        return re.search(r"\btools\b", template) is not None


def _fallback_conversation(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                           tool_choice: Any) -> list[dict[str, Any]]:
    """Plain role/content turns any template takes: tools in the system turn, calls and results as text."""
    out: list[dict[str, Any]] = []
    results_turn: dict[str, Any] | None = None  # the user turn collecting consecutive tool results
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if results_turn is not None:
                results_turn["content"] += "\n" + block
            else:
                results_turn = {"role": "user", "content": block}
                out.append(results_turn)
            continue
        results_turn = None
        content = m["content"]
        if m.get("tool_calls"):
            calls = [_call_text(c["function"]) for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": m["role"], "content": content})
    if tools:
        section = fallback_tools_prompt(tools, tool_choice)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _call_text(fn: Mapping[str, Any]) -> str:
    payload = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{payload}\n{TOOL_CALL_CLOSE}"


def fallback_tools_prompt(tools: list[dict[str, Any]], tool_choice: Any = None) -> str:
    """The system section that teaches a template without tool support the <tool_call> convention."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    text = FALLBACK_TOOLS_PROMPT.format(tools=listing)
    if tool_choice is True or tool_choice in FORCING_CHOICES:
        text += "\n\nYou must call at least one function."
    elif tool_choice not in AUTO_CHOICES and tool_choice is not False:
        text += f"\n\nCall the function {choice_name(tool_choice)!r}."
    return text
