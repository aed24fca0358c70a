"""Chat messages (+ tools) to a prompt through the model's own chat template, and generated text back to tool calls.

Both plugins and ``LLM.chat`` go through here; nothing else renders chat templates or parses tool calls.

Messages are OpenAI-style dicts: ``{"role": "system" | "user" | "assistant" | "tool", "content": str or a list of
{"type": "text", "text": ...} parts}``; assistant messages may carry ``tool_calls`` ([{"id", "type": "function",
"function": {"name", "arguments"}}], arguments a JSON string or a dict), tool messages ``tool_call_id`` / ``name``.
Tools are OpenAI function specs: ``{"type": "function", "function": {"name", "description", "parameters"}}``.

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
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .guided import check_json_schema, function_call_schema
from .outputs import ToolCall

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.x prefix before a JSON tool call
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
TEXT_PART_TYPES = ("text", "input_text")
FORCING_CHOICES = ("any", "required")
AUTO_CHOICES = (None, "auto", "none")

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


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ---- tools ------------------------------------------------------------------------------------------------------
def normalize_tools(tools: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Validated OpenAI function specs. Also takes a bare {"name", "description", "parameters"}.

    Every ``parameters`` schema must compile into a grammar (so a forced call can be constrained); a bad one
    raises a ValueError that names the tool.
    """
    if not tools:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of function specs, got {type(tools).__name__}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        spec = _function_spec(i, tool)
        if spec["name"] in seen:
            raise ValueError(f"two tools are named {spec['name']!r}; tool names must be unique")
        seen.add(spec["name"])
        out.append({"type": "function", "function": spec})
    return out


def _function_spec(i: int, tool: Any) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise ValueError(f"tools[{i}] must be a dict like {{'type': 'function', 'function': {{'name': ..., "
                         f"'parameters': {{...}}}}}}, got {type(tool).__name__}")
    fn = tool.get("function", tool)
    if not isinstance(fn, Mapping):
        raise ValueError(f"tools[{i}]['function'] must be a dict with 'name' and 'parameters'")
    if tool.get("type", "function") != "function":
        raise ValueError(f"tools[{i}] has type {tool.get('type')!r}; only 'function' tools are supported")
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME_PATTERN.match(name):
        raise ValueError(f"tools[{i}] has an invalid name {name!r}; use 1-64 letters, digits, '_' or '-'")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ValueError(f"tool {name!r}: description must be a string")
    _check_unicode(description, f"tool {name!r} description")
    parameters = fn.get("parameters")
    parameters = {"type": "object", "properties": {}} if parameters is None else parameters
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise ValueError(f"tool {name!r}: parameters must be a JSON schema of type 'object' (the arguments "
                         f"object), got {parameters!r:.120}")
    parameters = dict(parameters)
    check_json_schema(parameters, f"the parameters schema of tool {name!r}")
    return {"name": name, "description": description, "parameters": parameters}


def tool_names(tools: list[Mapping[str, Any]] | None) -> list[str]:
    """Names of OpenAI specs or bare function dicts, without validating them (cheap; used when parsing)."""
    return [t.get("function", t).get("name") for t in tools or [] if isinstance(t, Mapping)]


def tool_call_schema(tools: list[Mapping[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema a forced call is generated under: {"name": const, "arguments": <the tool's parameters>}.

    ``tool_choice``: "any" / "required" / True -> any of the tools; a tool's name (or {"type": "function",
    "function": {"name": ...}}) -> that tool; None / "auto" / "none" -> None (nothing forced).
    """
    if tool_choice in AUTO_CHOICES or tool_choice is False:
        return None
    tools = normalize_tools(tools)
    if not tools:
        raise ValueError(f"tool_choice={tool_choice!r} needs tools; pass tools=[...] or tool_choice=None")
    if tool_choice is True or tool_choice in FORCING_CHOICES:
        chosen = tools
    else:
        name = _choice_name(tool_choice)
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise ValueError(f"tool_choice names the tool {name!r}, which is not among the tools "
                             f"{tool_names(tools)}; pass one of those names, 'any', 'required', 'auto' or 'none'")
    return function_call_schema([t["function"] for t in chosen])


def _choice_name(tool_choice: Any) -> str:
    if isinstance(tool_choice, str):
        return tool_choice
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function", tool_choice)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            return fn["name"]
    raise ValueError(f"tool_choice {tool_choice!r} is not understood; pass 'auto', 'none', 'any', 'required', a "
                     "tool's name or {'type': 'function', 'function': {'name': ...}}")


def forced_call_prefix(formatter: "ChatFormatter") -> str:
    """Text to append after the generation prompt so that a forced call only has to be a JSON object."""
    return formatter.tool_call_prefix


def wrap_forced_call(generated_json: str, formatter: "ChatFormatter") -> str:
    """The forced call as the model would have written it (prefix + JSON + closing tag): ``parse_tool_calls`` and
    the chat history both read it."""
    prefix = formatter.tool_call_prefix
    closing = "\n" + TOOL_CALL_CLOSE if TOOL_CALL_OPEN in prefix else ""
    return prefix + generated_json + closing


# ---- parsing ----------------------------------------------------------------------------------------------------
def parse_tool_calls(text: str, tools: list[Mapping[str, Any]] | None = None) -> tuple[str, list[ToolCall]]:
    """Split generated text into (content, tool calls).

    Understands ``<tool_call>{...}</tool_call>`` blocks (Hermes/Qwen; the closing tag may be cut off), and a reply
    that is only JSON (Llama 3.x ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>`` or in a
    ```json fence; "arguments" works too; an object, a list, or several separated by ';'). Calls to names not in
    ``tools`` (when given) are not calls: their text stays in the content, so nothing is lost.
    """
    allowed = None if tools is None else set(tool_names(tools))
    calls: list[ToolCall] = []
    pieces, last = [], 0
    for block in re.finditer(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)",
                             text, flags=re.DOTALL):
        found = _calls_in(block.group(1), allowed)
        if found:
            calls += found
            pieces.append(text[last:block.start()])
            last = block.end()
    if calls:
        return ("".join(pieces) + text[last:]).strip(), calls
    found = _calls_in(_strip_wrappers(text), allowed)
    return ("", found) if found else (text, [])


def _strip_wrappers(text: str) -> str:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    return fence.group(1) if fence else body


def _calls_in(payload: str, allowed: set[str] | None) -> list[ToolCall]:
    """All calls in ``payload`` if it is nothing but call objects, else []."""
    values = _json_values(payload)
    calls = [_as_call(v, allowed) for v in values or []]
    return calls if calls and all(calls) else []  # type: ignore[return-value]


def _json_values(payload: str) -> list[Any] | None:
    """The JSON values making up all of ``payload`` (lists flattened), or None if anything else is there."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(payload) and payload[i] in " \t\r\n;,":
            i += 1
        if i == len(payload):
            return values
        try:
            value, i = decoder.raw_decode(payload, i)
        except ValueError:
            return None
        values.extend(value if isinstance(value, list) else [value])


def _as_call(value: Any, allowed: set[str] | None) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    fn = value.get("function") if isinstance(value.get("function"), dict) else value
    name = fn.get("name")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not isinstance(args, dict) or (allowed is not None and name not in allowed):
        return None
    return ToolCall(id=new_call_id(), name=name, arguments=args)


# ---- messages ---------------------------------------------------------------------------------------------------
def normalize_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated copies: roles checked, content as one string, tool calls as {"id", "type", "function": {"name",
    "arguments": dict}} (the form chat templates expect). Raises ValueError naming the message and the fix."""
    if not isinstance(messages, (list, tuple)) or not messages:
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
                out[key] = _check_unicode(str(message[key]), f"{where} {key}")
    return out


def _text_content(content: Any, where: str, role: str) -> str:
    if content is None and role == "assistant":  # an assistant turn that only calls tools
        return ""
    if isinstance(content, str):
        return _check_unicode(content, where)
    if isinstance(content, (list, tuple)):
        return "\n".join(_text_part(part, where) for part in content)
    raise ValueError(f"{where} has content of type {type(content).__name__}; pass a string or a list of "
                     "{'type': 'text', 'text': ...} parts")


def _text_part(part: Any, where: str) -> str:
    if isinstance(part, str):
        return _check_unicode(part, where)
    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
    if kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
        raise ValueError(f"{where} has a content part of type {kind!r}; this model reads text only, so send "
                         "images, audio and files as text (e.g. a description) or use a multimodal model")
    return _check_unicode(part["text"], where)


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
        _check_unicode(args, where)
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


def _check_unicode(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} contains a lone surrogate at index {exc.start}; pass valid Unicode text "
                         "(decode bytes with errors='replace')") from None
    return text


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
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=... (a Jinja "
                             "template), or call LLM.generate with a plain text prompt") from None


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
        text += f"\n\nCall the function {_choice_name(tool_choice)!r}."
    return text
