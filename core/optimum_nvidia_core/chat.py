"""Chat messages (+ a tool plan) to a prompt through the model's own chat template.

Both plugins and ``LLM.chat`` go through here; nothing else renders chat templates. The family's tool format
(``tool_formats``) is detected here once, from the template and the tokenizer, with what else the template says:
the tokens that end a turn, whether it demands strict user/assistant alternation, whether it thinks in <think>.

Messages are OpenAI-style dicts: ``{"role": "system" | "user" | "assistant" | "tool", "content": str or a list of
{"type": "text", "text": ...} parts}``; assistant messages may carry ``tool_calls`` ([{"id", "type": "function",
"function": {"name", "arguments"}}], arguments a JSON string or a dict), tool messages ``tool_call_id`` / ``name``
(a result without an id answers the earliest unanswered call of the turn before it, by name when it has one, and
a result without a name takes its call's).
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .prompt_encoding import SpecialTextGuard
from .reasoning import has_reasoning
from .text_checks import check_unicode
from .tool_calls import new_call_id
from .tool_formats import FallbackFormat, ToolFormat, ToolPlan, detect_format

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
TEXT_PART_TYPES = ("text", "input_text")

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
    return _answer_ids([_normalize_message(i, m) for i, m in enumerate(messages)])


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


def _answer_ids(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results without a tool_call_id or a name get those of the call they answer (templates need them)."""
    open_calls: list[dict[str, Any]] = []
    for m in conversation:
        if m.get("tool_calls"):
            open_calls = list(m["tool_calls"])
        elif m["role"] == "tool":
            match = next((c for c in open_calls if c["id"] == m.get("tool_call_id")), None)
            if match is None and "tool_call_id" not in m and open_calls:
                match = next((c for c in open_calls if c["function"]["name"] == m.get("name")), open_calls[0])
                m["tool_call_id"] = match["id"]
            if match is not None:
                open_calls.remove(match)
                m.setdefault("name", match["function"]["name"])
        else:
            open_calls = []
    return conversation


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
    """Renders messages (+ a tool plan) through the model's chat template.

    ``chat_template`` overrides the tokenizer's; ``model_dir`` is searched for chat_template.jinja/.json when the
    tokenizer carries none.
    """

    def __init__(self, tokenizer: Any, model_dir: str | Path | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or _template_from_dir(tokenizer, model_dir)
        template = self._template(tools=[], strict=False)  # the one used with tools (maybe a "tool_use" one)
        self.tool_format: ToolFormat = detect_format(template, template is not None and _reads_tools(template),
                                                     tokenizer)
        self.reasoning = has_reasoning(template, tokenizer)
        self.guard = SpecialTextGuard(tokenizer)

    # ---- rendering ---------------------------------------------------------------------------------------
    def render(self, messages: list[Mapping[str, Any]], tools: list[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True, tool_choice: Any = None) -> str:
        """The prompt text, exactly as the template writes it."""
        plan = ToolPlan.build(self.tool_format, tools, tool_choice)
        return self.render_plan(normalize_messages(messages), plan, add_generation_prompt=add_generation_prompt)

    def render_plan(self, conversation: list[dict[str, Any]], plan: ToolPlan, add_generation_prompt: bool = True,
                    hide_special_text: bool = False) -> str:
        """The prompt for normalized messages under ``plan``; with ``hide_special_text``, special-token text in
        the messages is left as placeholders for ``SpecialTextGuard.encode``."""
        template = self._template(plan.tools or None)
        fmt = plan.format
        if fmt.native and _reads_tools(template):
            conversation = fmt.history(conversation)
            tools = plan.tools or None
        else:
            fallback = fmt if isinstance(fmt, FallbackFormat) else FallbackFormat()
            conversation = fallback.conversation(conversation, plan.tools, plan.instruction(), self.alternates)
            tools = None
        if hide_special_text:
            conversation = [{**m, "content": self.guard.hide(m["content"])} for m in conversation]
        return self._apply(template, conversation, tools, add_generation_prompt)

    def _apply(self, template: str, conversation: list[dict[str, Any]], tools: list[dict] | None,
               add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt,
                tokenize=False, return_dict=False)
        except Exception as exc:  # jinja2 errors, the template's raise_exception(), KeyError/TypeError inside it
            if type(exc).__name__ == "TemplateSyntaxError":  # jinja2's: the template itself is broken
                raise ValueError(f"the model's chat template is not valid Jinja (line {exc.lineno}: {exc}); fix "
                                 "chat_template in the model's tokenizer_config.json or chat_template.jinja") from exc
            roles = [m["role"] for m in conversation]
            raise ValueError(
                f"the model's chat template rejected these messages (roles {roles}): {type(exc).__name__}: {exc}. "
                "Check the conversation against what this model's template accepts (e.g. one system message "
                "first, then user and assistant turns, ending with a user or tool turn)") from exc

    # ---- what the template says about itself -------------------------------------------------------------
    @functools.cached_property
    def alternates(self) -> bool:
        """Whether the template refuses two user turns in a row (Llama 2): the fallback then merges them."""
        if self._template(None, strict=False) is None:
            return False
        return self._probe([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True) is None

    @functools.cached_property
    def end_of_turn_ids(self) -> list[int]:
        """Ids of the tokens that end an assistant turn: the one the template closes turns with, and the
        format's others (Llama 3's <|eom_id|> after a built-in tool call)."""
        vocab = getattr(self.tokenizer, "added_tokens_encoder", {}) or {}
        texts = [t for t in (self._turn_end_text(),) if t] + list(self.tool_format.extra_end_of_turn)
        return sorted({vocab[t] for t in texts if t in vocab})

    def _turn_end_text(self) -> str | None:
        text = self._probe([{"role": "user", "content": "\x01q"}, {"role": "assistant", "content": "\x01a"}], False)
        after = text[text.find("\x01a") + 2:].lstrip(" ") if text and "\x01a" in text else ""
        return next((t for t in self.guard.specials if after.startswith(t)), None)

    def _probe(self, conversation: list[dict[str, Any]], add_generation_prompt: bool) -> str | None:
        """The template's rendering of a probe conversation (None if it refuses it), without tools or, for
        templates that need them (Hermes' tool_use), with an empty list."""
        template = self._template(None, strict=False)
        for tools in (None, []):
            try:
                return self._apply(template, conversation, tools, add_generation_prompt) if template else None
            except ValueError:
                continue
        return None

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
