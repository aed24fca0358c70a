"""Chat messages (+ tools, tool_choice, structured output) to a prompt and the SamplingParams that serve it.

The one place that decides how a chat request is generated; both plugins reach it through ``LLM.chat_stream``.
A forced tool call (``tool_choice`` "any"/"required"/a tool's name) appends the template's call opener to the
prompt and constrains the rest to a JSON object that validates against the chosen tool's schema. A reply
constrained to a JSON object schema (``params.guided_json``) gets a system sentence naming the schema's keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .chat import ChatFormatter, normalize_messages
from .sampling_params import SamplingParams
from .tool_calls import forced_call_prefix, normalize_tools, tool_call_schema

AUTO_CHOICES = (None, "auto")


class ChatRequestBuilder:
    def __init__(self, tokenizer: Any, model_dir: Path | None = None):
        self.tokenizer = tokenizer
        self.formatter = ChatFormatter(tokenizer, model_dir)

    def prepare(self, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
                tool_choice: str | None = None) -> tuple[list[int], SamplingParams, bool]:
        """Returns (prompt token ids, params to generate with, whether a tool call is forced)."""
        tools = normalize_tools(tools) if tools else []
        if tool_choice == "none":
            tools = []
        forced = bool(tools) and tool_choice not in AUTO_CHOICES
        if tool_choice not in AUTO_CHOICES and tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs tools; pass tools=[...] or tool_choice=None")
        if is_object_schema(params.guided_json):  # the caller's structured output, not a forced call's schema
            messages = with_json_instruction(normalize_messages(messages), params.guided_json)
        text = self.formatter.render(messages, tools or None, tool_choice=tool_choice)
        if forced:
            text += forced_call_prefix(self.formatter)
            params = params.model_copy(update={"guided_json": tool_call_schema(tools, tool_choice)})
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, params, forced


# ---- structured output hint -------------------------------------------------------------------------------------
def is_object_schema(json_schema: Any) -> bool:
    """Whether ``json_schema`` describes a JSON object (what structured output asks for)."""
    if not isinstance(json_schema, dict):
        return False
    return json_schema.get("type") == "object" or ("type" not in json_schema and "properties" in json_schema)


def with_json_instruction(messages: list[dict[str, Any]], json_schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The (normalized) messages plus a system instruction that says which JSON the reply is constrained to.

    The grammar already guarantees valid JSON; telling the model the keys and what they mean is what lets a
    small model (SmolLM2) fill them with sensible values instead of rambling inside the first string until
    max_tokens.
    """
    instruction = json_instruction(json_schema)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def json_instruction(json_schema: dict[str, Any]) -> str:
    """One plain sentence; small models follow 'the keys "a" (what a is) and "b" (...)' better than a schema."""
    properties = json_schema.get("properties")
    if isinstance(properties, dict) and properties:
        keys = [f'"{name}"' + (f" ({spec['description']})" if isinstance(spec, dict) and spec.get("description")
                               else "") for name, spec in properties.items()]
        listed = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
        return f"Answer in JSON with the key{'s' if len(keys) > 1 else ''} {listed}."
    if json_schema.get("type") == "object" and len(json_schema) == 1:
        return "Answer with a JSON object."
    return "Answer in JSON that follows this JSON schema: " + json.dumps(json_schema, ensure_ascii=False)
