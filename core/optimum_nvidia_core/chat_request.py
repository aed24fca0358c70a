"""Chat messages (+ tools, tool_choice, structured output) to prompt ids, the SamplingParams that serve them,
and the request's tool plan.

The one place that decides how a chat request is generated; both plugins reach it through ``LLM.chat_stream``.
``prepare`` builds the tool plan once (raw tools + tool_choice), renders the prompt with it, and, for a forced
call, appends the family's call opener and constrains the rest to the family's native JSON (``[TOOL_CALLS]`` and
a list of calls for Mistral, ``{"name", "parameters"}`` for Llama 3, ``<tool_call>`` and one object for Hermes
and the fallback). The family's end-of-turn tokens are added to the stop token ids. A reply constrained to a JSON
object schema (``params.guided_json``) gets a system sentence naming the schema's keys. On a reasoning model
(``<think>``), a constrained reply starts after an empty thinking block: the grammar covers the answer only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .chat import ChatFormatter, normalize_messages
from .reasoning import THINK_CLOSE, THINK_OPEN, opens_thinking
from .sampling_params import SamplingParams
from .tool_formats import ToolPlan


class ChatRequestBuilder:
    def __init__(self, tokenizer: Any, model_dir: Path | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.formatter = ChatFormatter(tokenizer, model_dir, chat_template)
        self.marker_ids = _marker_ids(tokenizer, self.formatter)

    @property
    def tool_format(self):
        return self.formatter.tool_format

    def prepare(self, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
                tool_choice: Any = None, *, parallel_tool_calls: bool = True, allow_special_tokens: bool = False
                ) -> tuple[list[int], SamplingParams, ToolPlan]:
        """Returns (prompt token ids, params to generate with, the tool plan the output is parsed with).

        ``parallel_tool_calls=False``: a forced reply holds exactly one call. Special-token text inside messages
        stays plain text unless ``allow_special_tokens``."""
        formatter = self.formatter
        plan = ToolPlan.build(formatter.tool_format, tools, tool_choice, reasoning=formatter.reasoning,
                              marker_ids=self.marker_ids, single_call=not parallel_tool_calls)
        conversation = normalize_messages(messages)
        if is_object_schema(params.guided_json):  # the caller's structured output, not a forced call's schema
            conversation = with_json_instruction(conversation, params.guided_json)
        text = formatter.render_plan(conversation, plan, hide_special_text=not allow_special_tokens)
        thinking = formatter.reasoning and opens_thinking(text)
        if thinking and (plan.forced or params.guided_json is not None):  # the grammar covers the answer only
            text, thinking = text + "\n" + THINK_CLOSE + "\n\n", False
        if plan.forced:
            text += plan.format.forced_prefix
            params = params.model_copy(update={"guided_json": plan.forced_schema()})
        params = _with_stop_ids(params, formatter.end_of_turn_ids)
        ids = formatter.guard.encode(text)
        return ids, params, plan.replace(thinking_open=thinking)


def _with_stop_ids(params: SamplingParams, ids: list[int]) -> SamplingParams:
    """``params`` stopping at the family's end-of-turn tokens too (unless the caller ignores the end of turn)."""
    if params.ignore_eos:
        return params
    missing = [i for i in ids if i not in params.stop_token_ids]
    return params.model_copy(update={"stop_token_ids": [*params.stop_token_ids, *missing]}) if missing else params


def _marker_ids(tokenizer: Any, formatter: ChatFormatter) -> dict[int, str]:
    """Token ids of the texts that open a call or a thought, when the tokenizer has them as single tokens: the
    stream puts their text back when special tokens are skipped."""
    vocab = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    texts = list(formatter.tool_format.markers) + ([THINK_OPEN, THINK_CLOSE] if formatter.reasoning else [])
    return {vocab[t]: t for t in texts if t in vocab}


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
