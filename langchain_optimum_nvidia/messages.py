"""LangChain messages -> the core's chat dicts, and the core's streamed deltas -> LangChain chunks."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import tool_call_chunk

from optimum_nvidia_core.outputs import RequestOutput, Usage

from ._settings import PROVIDER

# Content blocks that carry no text for the model: tool calls travel in AIMessage.tool_calls, and earlier
# reasoning is not fed back (as chat templates of reasoning models also drop it).
_SKIPPED_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "thinking", "reasoning", "redacted_thinking"})


# ---- LangChain -> core ------------------------------------------------------------------------------------
def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """OpenAI-style message dicts for ``LLM.chat_stream``; AI tool calls and tool results round-trip."""
    return [_to_chat_dict(message) for message in messages]


def _to_chat_dict(message: BaseMessage) -> dict[str, Any]:
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": _text(message, "system")}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": _text(message, "user")}
    if isinstance(message, AIMessage):
        out: dict[str, Any] = {"role": "assistant", "content": _text(message, "assistant")}
        if message.tool_calls:
            out["tool_calls"] = [
                {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["args"]}}
                for call in message.tool_calls
            ]
        return out
    if isinstance(message, ToolMessage):
        out = {"role": "tool", "content": _text(message, "tool"), "tool_call_id": message.tool_call_id}
        if message.name:
            out["name"] = message.name
        return out
    if isinstance(message, FunctionMessage):  # the legacy form of a tool result
        return {"role": "tool", "content": _text(message, "tool"), "name": message.name}
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": _text(message, message.role)}
    raise TypeError(
        f"ChatOptimumNvidia cannot send a {type(message).__name__} to the model; "
        "use SystemMessage, HumanMessage, AIMessage, ToolMessage or ChatMessage"
    )


def _text(message: BaseMessage, role: str) -> str:
    """The message's text; a non-text block (image, audio, file) is refused: the model reads text only."""
    if isinstance(message.content, str):
        return message.content
    parts: list[str] = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") not in _SKIPPED_BLOCKS:
            raise ValueError(
                f"a {role} message has a {block.get('type')!r} content block, but this is a text-only model; "
                "send text content (or describe the file in words)"
            )
    return "".join(parts)


# ---- core -> LangChain ------------------------------------------------------------------------------------
def chunk_message(delta: RequestOutput, model_name: str) -> AIMessageChunk:
    """One streamed delta as an AIMessageChunk; only the last one carries tool calls, usage and metadata."""
    # The <think> part streams in additional_kwargs["reasoning_content"]; langchain-core turns it into a
    # {"type": "reasoning"} block of message.content_blocks.
    extra = {"additional_kwargs": {"reasoning_content": delta.reasoning}} if delta.reasoning else {}
    if not delta.finished:
        return AIMessageChunk(content=delta.text, **extra)
    return AIMessageChunk(
        content=delta.text,
        **extra,
        tool_call_chunks=[
            tool_call_chunk(name=call.name, args=json.dumps(call.arguments, ensure_ascii=False), id=call.id, index=i)
            for i, call in enumerate(delta.tool_calls)
        ],
        usage_metadata=usage_metadata(delta.usage),
        response_metadata=response_metadata(delta, model_name),
        chunk_position="last",
    )


def usage_metadata(usage: Usage | None) -> UsageMetadata:
    usage = usage or Usage()
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        input_token_details=InputTokenDetails(cache_read=usage.cached_tokens),
    )


def response_metadata(delta: RequestOutput, model_name: str) -> dict[str, Any]:
    """model_name, finish_reason and timings (seconds, tokens/s) of a finished request."""
    meta: dict[str, Any] = {"model_name": model_name, "model_provider": PROVIDER, "finish_reason": delta.finish_reason}
    metrics = delta.metrics
    if metrics is not None:
        completion_tokens = delta.usage.completion_tokens if delta.usage else 0
        meta["time_to_first_token_s"] = metrics.time_to_first_token
        meta["decode_tokens_per_s"] = metrics.decode_tokens_per_s(completion_tokens)
        if metrics.finished_time is not None:
            meta["total_time_s"] = metrics.finished_time - metrics.arrival_time
    return meta
