"""LlamaIndex messages and tools -> the core's chat dicts; the core's streamed deltas -> LlamaIndex responses.

Pure conversions, no engine: the core (``LLM.chat_stream``) renders the chat template, puts tools in the prompt and
parses tool calls; this module only changes the shape of what goes in and comes out.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection

from optimum_nvidia_core.outputs import RequestOutput, cut_off_error
from optimum_nvidia_core.sampling_params import SamplingParams
from optimum_nvidia_core.tool_calls import constrained_reply

# LlamaIndex roles -> the four roles chat templates know.
_ROLES = {
    MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "system", MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant", MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool", MessageRole.FUNCTION: "tool",
}
# Blocks that carry no text for the model: tool calls travel as "tool_calls", earlier reasoning is not fed back
# (chat templates of reasoning models drop it too), cache points are a remote-API hint.
_SKIPPED_BLOCKS = (ToolCallBlock, ThinkingBlock, CachePoint)


# ---- LlamaIndex -> core -----------------------------------------------------------------------------------
def to_chat_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI-style message dicts for ``LLM.chat_stream``; assistant tool calls and tool results round-trip."""
    return [_to_chat_dict(message) for message in messages]


def _to_chat_dict(message: ChatMessage) -> dict[str, Any]:
    role = _ROLES.get(message.role)
    if role is None:
        raise ValueError(f"OptimumNvidiaLLM cannot send a message with role {message.role!r}; use one of "
                         f"{sorted(r.value for r in _ROLES)}")
    out: dict[str, Any] = {"role": role, "content": _text(message, role)}
    if role == "assistant":
        calls = _tool_calls_of(message)
        if calls:
            out["tool_calls"] = calls
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if message.additional_kwargs.get(key):
                out[key] = message.additional_kwargs[key]
        if "name" not in out and message.additional_kwargs.get("tool_name"):
            out["name"] = message.additional_kwargs["tool_name"]
    return out


def _text(message: ChatMessage, role: str) -> str:
    """The message's text; a non-text block (image, audio, document) is refused: the model reads text only."""
    parts: list[str] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif not isinstance(block, _SKIPPED_BLOCKS):
            raise ValueError(
                f"a {role} message has a {type(block).__name__}, but this is a text-only model; "
                "send TextBlocks (or describe the file in words)"
            )
    return "\n".join(parts)


def _tool_calls_of(message: ChatMessage) -> list[dict[str, Any]]:
    """The assistant's tool calls: ToolCallBlocks (LlamaIndex >= 0.14) or OpenAI-style additional_kwargs."""
    calls = [
        {"id": block.tool_call_id or f"call_{i}", "type": "function",
         "function": {"name": block.tool_name, "arguments": _arguments(block.tool_kwargs)}}
        for i, block in enumerate(message.blocks) if isinstance(block, ToolCallBlock)
    ]
    if calls:
        return calls
    for i, call in enumerate(message.additional_kwargs.get("tool_calls") or []):
        call = call.model_dump() if hasattr(call, "model_dump") else dict(call)
        function = call.get("function") or {}
        calls.append({"id": call.get("id") or f"call_{i}", "type": "function",
                      "function": {"name": function.get("name", ""),
                                   "arguments": _arguments(function.get("arguments"))}})
    return calls


def _arguments(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def to_tool_specs(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-style tool specs from LlamaIndex tools (anything with ``.metadata.to_openai_tool()``)."""
    return [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]


def to_tool_choice(tool_choice: str | dict[str, Any] | None, tool_required: bool) -> Any:
    """The tool_choice for the core (which reads every spelling, OpenAI dicts included); LlamaIndex's
    ``tool_required=True`` forces a call when no tool is named."""
    return "required" if tool_required and tool_choice in (None, "auto") else tool_choice


# ---- core -> LlamaIndex -----------------------------------------------------------------------------------
def response_kwargs(delta: RequestOutput, model_name: str) -> dict[str, Any]:
    """additional_kwargs of a finished response: token counts (OpenAI names), finish reason and timings."""
    if not delta.finished:
        return {}
    usage = delta.usage
    out: dict[str, Any] = {"model_name": model_name, "finish_reason": delta.finish_reason}
    if usage is not None:
        out.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens, cached_tokens=usage.cached_tokens)
    if delta.metrics is not None:
        out["time_to_first_token_s"] = delta.metrics.time_to_first_token
        out["decode_tokens_per_s"] = delta.metrics.decode_tokens_per_s(usage.completion_tokens if usage else 0)
    return out


def chat_response(text: str, delta: RequestOutput, model_name: str, reasoning: str = "") -> ChatResponse:
    """The reply so far (``text``, and the thinking so far as a ThinkingBlock) with this step's ``delta``; the
    last one carries the tool calls as blocks."""
    blocks: list[Any] = [ThinkingBlock(content=reasoning)] if reasoning else []
    blocks += [TextBlock(text=text)] if text or not delta.tool_calls else []
    blocks += [ToolCallBlock(tool_call_id=call.id, tool_name=call.name, tool_kwargs=call.arguments)
               for call in delta.tool_calls]
    message = ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)
    kwargs = response_kwargs(delta, model_name)
    if delta.reasoning:
        kwargs["thinking_delta"] = delta.reasoning
    return ChatResponse(message=message, delta=delta.text, raw=_raw(delta), additional_kwargs=kwargs)


def completion_response(text: str, delta: RequestOutput, model_name: str, reasoning: str = "") -> CompletionResponse:
    kwargs = response_kwargs(delta, model_name)
    if delta.reasoning:
        kwargs["thinking_delta"] = delta.reasoning
    return CompletionResponse(text=text, delta=delta.text, raw=_raw(delta), additional_kwargs=kwargs)


def _responses(deltas: Iterator[RequestOutput], make: Callable, model_name: str) -> Iterator:
    """One LlamaIndex response per core delta: ``make(text so far, delta, model_name, reasoning so far)``."""
    text = reasoning = ""
    for delta in deltas:
        text, reasoning = text + delta.text, reasoning + (delta.reasoning or "")
        yield make(text, delta, model_name, reasoning)


async def _aresponses(deltas: AsyncIterator[RequestOutput], make: Callable, model_name: str) -> AsyncIterator:
    text = reasoning = ""
    async for delta in deltas:
        text, reasoning = text + delta.text, reasoning + (delta.reasoning or "")
        yield make(text, delta, model_name, reasoning)


def refuse_cut_off(deltas: Iterator[RequestOutput], params: SamplingParams, tool_choice: Any
                   ) -> Iterator[RequestOutput]:
    """The deltas; a forced call or structured output cut off at max_tokens raises an error that says so."""
    what = constrained_reply(params.guided_json, tool_choice)
    try:
        for delta in deltas:
            if what and delta.finish_reason == "length":
                raise cut_off_error(what, params.max_tokens)
            yield delta
    finally:
        deltas.close()


async def arefuse_cut_off(deltas: AsyncIterator[RequestOutput], params: SamplingParams, tool_choice: Any
                          ) -> AsyncIterator[RequestOutput]:
    what = constrained_reply(params.guided_json, tool_choice)
    try:
        async for delta in deltas:
            if what and delta.finish_reason == "length":
                raise cut_off_error(what, params.max_tokens)
            yield delta
    finally:
        await deltas.aclose()


def chat_responses(model_name: str, deltas: Iterator[RequestOutput]) -> ChatResponseGen:
    return _responses(deltas, chat_response, model_name)


def achat_responses(model_name: str, deltas: AsyncIterator[RequestOutput]) -> ChatResponseAsyncGen:
    return _aresponses(deltas, chat_response, model_name)


def completion_responses(model_name: str, deltas: Iterator[RequestOutput]) -> CompletionResponseGen:
    return _responses(deltas, completion_response, model_name)


def acompletion_responses(model_name: str, deltas: AsyncIterator[RequestOutput]) -> CompletionResponseAsyncGen:
    return _aresponses(deltas, completion_response, model_name)


def _raw(delta: RequestOutput) -> dict[str, Any]:
    # A plain dict: agents put ``raw`` into their event streams, which must serialize.
    return dataclasses.asdict(delta)


def tool_selections(message: ChatMessage) -> list[ToolSelection]:
    """The tool calls of an assistant message as LlamaIndex ToolSelections."""
    return [
        ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name,
                      tool_kwargs=_arguments(block.tool_kwargs))
        for block in message.blocks if isinstance(block, ToolCallBlock)
    ]


def keep_first_tool_call(response: ChatResponse) -> ChatResponse:
    """Drop all tool calls but the first (LlamaIndex's allow_parallel_tool_calls=False)."""
    blocks, seen = [], False
    for block in response.message.blocks:
        if isinstance(block, ToolCallBlock):
            if seen:
                continue
            seen = True
        blocks.append(block)
    response.message.blocks = blocks
    return response

