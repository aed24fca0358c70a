"""OpenAI requests in, OpenAI responses out, over one ``LLM``: the conversion layer and nothing else.

``chat`` and ``completions`` are async generators of plain dicts: one response for ``stream=false``; for
``stream=true`` the chunks, then always a last usage chunk (``choices: []``), which the HTTP layer drops unless the
client asked for it. A bad request raises before the first item (chat: the facade checks the conversation and its
prompt before its first delta; completions: every prompt is checked and submitted before any is read), so the
caller can still answer 400 instead of breaking a stream it has started. They run where the engine is: in the
server's process, or inside a Ray replica.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..outputs import RequestOutput, Usage
from .errors import APIError
from .logprobs import chat_logprobs, completion_logprobs
from .metrics import RequestTimer
from .protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class _Choice:
    """What a non-streamed response accumulates per choice."""

    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[Any] = field(default_factory=list)
    offset: int = 0  # streamed completions: text offset of the next token's logprob entry

    def add(self, delta: RequestOutput) -> None:
        self.text += delta.text
        self.reasoning += getattr(delta, "reasoning", None) or ""
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.tool_calls = delta.tool_calls or self.tool_calls


class OpenAIServing:
    def __init__(self, llm: Any, model_name: str):
        self.llm = llm
        self.model_name = model_name
        self._token_text: dict[int, str] = {}

    # ---- /v1/chat/completions --------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, timer: RequestTimer | None = None) -> AsyncIterator[dict]:
        params = req.sampling_params()
        head = self._head("chatcmpl", "chat.completion.chunk" if req.stream else "chat.completion")
        top = params.logprobs
        source = self.llm.achat_stream(req.messages, params, tools=req.tools, tool_choice=req.tool_choice,
                                       parallel_tool_calls=req.parallel_tool_calls is not False)
        async with contextlib.aclosing(source):
            deltas = _timed(source, timer)
            if not req.stream:
                yield await self._chat_response(head, deltas, top, params.n)
                return
            async for chunk in self._chat_chunks(head, deltas, top):
                yield chunk

    async def _chat_chunks(self, head: dict, deltas: AsyncIterator[RequestOutput], top: int | None
                           ) -> AsyncIterator[dict]:
        started: set[int] = set()
        async for d in deltas:
            delta: dict[str, Any] = {}
            if d.index not in started:
                started.add(d.index)
                delta["role"] = "assistant"
            if d.text:
                delta["content"] = d.text
            if reasoning := getattr(d, "reasoning", None):
                delta["reasoning_content"] = delta["reasoning"] = reasoning
            logprobs = {"content": self._chat_logprobs(d.token_ids, d.logprobs, top)} if top is not None else None
            if d.tool_calls:  # OpenAI's shape: the call's id and name first, then its arguments
                if delta:
                    yield {**head, "choices": [_chunk_choice(d.index, delta, logprobs)]}
                    delta, logprobs = {}, None
                for j, call in enumerate(d.tool_calls):
                    opener = {"index": j, "id": call.id, "type": "function",
                              "function": {"name": call.name, "arguments": ""}}
                    args = {"index": j, "function": {"arguments": json.dumps(call.arguments, ensure_ascii=False)}}
                    yield {**head, "choices": [_chunk_choice(d.index, {"tool_calls": [opener]})]}
                    yield {**head, "choices": [_chunk_choice(d.index, {"tool_calls": [args]})]}
            if delta or logprobs or d.finish_reason:
                yield {**head, "choices": [_chunk_choice(d.index, delta, logprobs, _finish(d))]}
            if d.finished:
                yield {**head, "choices": [], "usage": usage_dict(d.usage)}

    async def _chat_response(self, head: dict, deltas: AsyncIterator[RequestOutput], top: int | None, n: int
                             ) -> dict:
        choices = [_Choice() for _ in range(n)]
        usage = None
        async for d in deltas:
            choices[d.index].add(d)
            usage = d.usage or usage
        out = []
        for i, c in enumerate(choices):
            message: dict[str, Any] = {"role": "assistant", "content": c.text if c.text or not c.tool_calls else None}
            if c.reasoning:
                message["reasoning_content"] = message["reasoning"] = c.reasoning
            if c.tool_calls:
                message["tool_calls"] = [{"id": t.id, "type": "function", "function": {
                    "name": t.name, "arguments": json.dumps(t.arguments, ensure_ascii=False)}} for t in c.tool_calls]
            logprobs = {"content": self._chat_logprobs(c.token_ids, c.logprobs, top)} if top is not None else None
            out.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": _finish(c)})
        return {**head, "choices": out, "usage": usage_dict(usage)}

    # ---- /v1/completions -------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, timer: RequestTimer | None = None) -> AsyncIterator[dict]:
        params = req.sampling_params()
        head = self._head("cmpl", "text_completion")
        prompts = req.prompts
        streams = await asyncio.to_thread(_submit_all, self.llm, prompts, params)  # before any output
        choices = [_Choice() for _ in range(len(prompts) * params.n)]
        usage = Usage()
        try:
            async for p, d in _timed_merge(streams, timer):
                index = p * params.n + d.index
                if d.finished and d.usage:
                    usage = _add_usage(usage, d.usage)
                if not req.stream:
                    choices[index].add(d)
                    continue
                # A delta whose text is held back (a character or stop string still arriving) still carries its
                # tokens' log-probabilities; offsets run over the token texts, as in the whole response.
                if d.text or d.finish_reason or (params.logprobs is not None and d.token_ids):
                    logprobs = None
                    if params.logprobs is not None:
                        seen = choices[index]
                        logprobs = self._completion_logprobs(d.token_ids, d.logprobs, params.logprobs, seen.offset)
                        seen.offset += sum(len(self._text_of(t)) for t in d.token_ids)
                    choice = {"index": index, "text": d.text, "logprobs": logprobs, "finish_reason": _finish(d)}
                    yield {**head, "choices": [choice]}
        finally:
            for stream in streams:
                await stream.aclose()
        if timer is not None:
            timer.finish(usage)
        if req.stream:
            yield {**head, "choices": [], "usage": usage_dict(usage)}
            return
        yield {**head, "usage": usage_dict(usage), "choices": [
            {"index": i, "text": c.text, "finish_reason": _finish(c),
             "logprobs": (self._completion_logprobs(c.token_ids, c.logprobs, params.logprobs)
                          if params.logprobs is not None else None)} for i, c in enumerate(choices)]}

    # ---- helpers ---------------------------------------------------------------------------------------
    def _head(self, prefix: str, kind: str) -> dict[str, Any]:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name}

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.llm.tokenizer.decode([token_id])
        return text

    def _chat_logprobs(self, token_ids: list[int], logprobs: list | None, top: int | None) -> list[dict]:
        return chat_logprobs(token_ids, logprobs or [], top or 0, self._text_of)

    def _completion_logprobs(self, token_ids: list[int], logprobs: list | None, top: int, offset: int = 0) -> dict:
        return completion_logprobs(token_ids, logprobs or [], top, self._text_of, offset)


def _submit_all(llm: Any, prompts: list, params: Any) -> list:
    """One request per prompt, each checked as it is submitted; if one is bad, the others are aborted and its
    error raised, so that one bad prompt of a list is a 400 rather than an error in the middle of a stream."""
    streams = []
    try:
        for prompt in prompts:
            streams.append(llm.stream(prompt, params))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


def usage_dict(usage: Usage | None) -> dict[str, Any]:
    usage = usage or Usage()
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _add_usage(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                 a.cached_tokens + b.cached_tokens)


def _chunk_choice(index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _finish(item: Any) -> str | None:
    reason = item.finish_reason
    if reason == "error":
        raise APIError(500, "the engine failed while generating this request", code="engine_error")
    return "stop" if reason == "abort" else reason


async def _timed(source: AsyncIterator[RequestOutput], timer: RequestTimer | None) -> AsyncIterator[RequestOutput]:
    async for d in source:
        if timer is not None:
            timer.tokens(len(d.token_ids))
            if d.finished:
                timer.finish(d.usage)
        yield d


async def _timed_merge(streams: list, timer: RequestTimer | None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, delta) from every stream as they come; one stream needs no task."""
    if len(streams) == 1:
        async for d in _timed(streams[0], timer):
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Any) -> None:
        try:
            async for d in stream:
                queue.put_nowait((i, d))
        except Exception as exc:  # noqa: BLE001 - re-raised on the reader's side
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, d = await queue.get()
            if d is None:
                remaining -= 1
            elif isinstance(d, Exception):
                raise d
            else:
                if timer is not None:
                    timer.tokens(len(d.token_ids))
                yield i, d
    finally:
        for task in tasks:
            task.cancel()
