"""One tool format per model family, detected from the chat template and the tokenizer (never the model's name).

| format | families | a call in a reply |
|---|---|---|
| ``llama3_json`` | Llama 3.1 / 3.2 / 3.3 | ``{"name": ..., "parameters": {...}}`` (``<|python_tag|>`` may open it) |
| ``hermes`` | Qwen2.5, Hermes 2 Pro / 3 | ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks |
| ``mistral`` | Mistral v0.3, Nemo, Small | ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``, 9-char ids |
| ``fallback`` | no tools in template (SmolLM2, Llama 2, R1 distills) | the Hermes convention, taught in the prompt |
"""
from __future__ import annotations

from typing import Any

from .base import ToolFormat
from .fallback import FallbackFormat
from .hermes import TOOL_CALL_OPEN, HermesFormat
from .llama3 import PYTHON_TAG, Llama3Format
from .mistral import TOOL_CALLS, MistralFormat
from .plan import ToolPlan

__all__ = ["FallbackFormat", "HermesFormat", "Llama3Format", "MistralFormat", "ToolFormat", "ToolPlan",
           "detect_format"]


def detect_format(template: str | None, reads_tools: bool, tokenizer: Any) -> ToolFormat:
    """The format of the family whose template (the one used with tools) and tokenizer these are."""
    if template is None or not reads_tools:
        return FallbackFormat()
    vocab = set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    if TOOL_CALLS in template or (TOOL_CALLS in vocab and TOOL_CALL_OPEN not in template):
        return MistralFormat()
    if TOOL_CALL_OPEN in template:
        return HermesFormat()
    if PYTHON_TAG in template or '"parameters"' in template or PYTHON_TAG in vocab:
        return Llama3Format()
    return HermesFormat()  # an unknown template that reads tools: tag blocks and bare JSON are both read
