"""ChatOptimumNvidia: a LangChain chat model on the optimum-nvidia engine (in-flight batched, streamed).

``_stream`` / ``_astream`` are the one real path: they read the core's sync / async chat stream (the async one
awaits the engine thread's deltas on the event loop: no thread per request). ``_generate`` / ``_agenerate`` fold
those chunks, so invoke, stream, batch and abatch all join the engine's one running batch.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import (
    BaseChatModel,
    LangSmithParams,
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import Field

from optimum_nvidia_core.outputs import RequestOutput, cut_off_error
from optimum_nvidia_core.sampling_params import SamplingParams
from optimum_nvidia_core.tool_calls import constrained_reply

from ._settings import OptimumNvidiaFields
from .messages import chunk_message, to_chat_dicts
from .structured_output import Method, structured_runnable
from .tools import convert_tools, normalize_tool_choice

# Call kwargs that LangChain itself may forward to _stream and that are not sampling options.
_LANGCHAIN_CALL_ARGS = ("stream", "ls_structured_output_format", "structured_output_format")


@dataclass
class _ChatRequest:
    """Everything one call sends to the core, resolved from fields and call kwargs."""

    model_name: str
    messages: list[dict[str, Any]]
    params: SamplingParams
    tools: list[dict[str, Any]] | None
    tool_choice: str | None
    parallel_tool_calls: bool

    def chunk(self, delta: RequestOutput) -> ChatGenerationChunk:
        if delta.finish_reason == "length" and (what := constrained_reply(self.params.guided_json, self.tool_choice)):
            raise cut_off_error(what, self.params.max_tokens)
        if delta.finished and delta.tool_calls and not self.parallel_tool_calls:
            delta = replace(delta, tool_calls=delta.tool_calls[:1])
        message = chunk_message(delta, self.model_name)
        info = {"finish_reason": delta.finish_reason, "model_name": self.model_name} if delta.finished else None
        return ChatGenerationChunk(message=message, generation_info=info)


class ChatOptimumNvidia(OptimumNvidiaFields, BaseChatModel):
    """Chat model served by optimum-nvidia's shared engine (bf16 or FP8, paged KV cache, in-flight batching).

    Example:
        .. code-block:: python

            from langchain_optimum_nvidia import ChatOptimumNvidia

            chat = ChatOptimumNvidia(model="HuggingFaceTB/SmolLM2-135M-Instruct", temperature=0, max_tokens=64)
            for chunk in chat.stream("Name three colors."):
                print(chunk.content, end="", flush=True)

    Tools: ``chat.bind_tools([fn], tool_choice="any")`` forces a call whose arguments are generated under a
    grammar built from the tool's JSON schema, so they always validate. Structured output:
    ``chat.with_structured_output(MySchema)`` (method "json_schema", "function_calling" or "json_mode").
    """

    streaming: bool = Field(False, description="Make invoke() stream internally (callbacks get every token).")

    @property
    def _llm_type(self) -> str:
        return "optimum-nvidia-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.identifying_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self.ls_params("chat", stop, kwargs)

    # ---- the one real path -----------------------------------------------------------------------------
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        llm = self.get_llm(kwargs.get("model"))
        deltas = llm.chat_stream(request.messages, request.params, tools=request.tools, tool_choice=request.tool_choice,
                                 parallel_tool_calls=request.parallel_tool_calls)
        try:
            for delta in deltas:
                chunk = request.chunk(delta)
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            deltas.close()  # a consumer that stops early aborts the request and frees its KV blocks

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        llm = await self.aget_llm(kwargs.get("model"))  # a first call loads the engine off the event loop
        deltas = llm.achat_stream(request.messages, request.params, tools=request.tools,
                                  tool_choice=request.tool_choice, parallel_tool_calls=request.parallel_tool_calls)
        try:
            async for delta in deltas:
                chunk = request.chunk(delta)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await deltas.aclose()

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop=stop, run_manager=run_manager, **kwargs))

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _ChatRequest:
        options = {k: v for k, v in kwargs.items() if k not in _LANGCHAIN_CALL_ARGS}
        model = options.pop("model", None)
        tools = options.pop("tools", None) or None
        tool_choice = options.pop("tool_choice", None)
        parallel_tool_calls = options.pop("parallel_tool_calls", None)
        params = self.sampling_params(stop, options)
        return _ChatRequest(
            model_name=model or self.model_id,
            messages=to_chat_dicts(messages),
            params=params,
            tools=tools,
            tool_choice=normalize_tool_choice(tool_choice, tools or []),
            parallel_tool_calls=parallel_tool_calls is not False,
        )

    # ---- tools and structured output ---------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (functions, pydantic models, TypedDicts, JSON schemas or BaseTools).

        ``tool_choice``: None / "auto" (the model decides), "none", "any" / "required" / True (some tool must be
        called), or a tool's name (that tool must be called). A forced call is generated under a grammar built
        from the tool's schema, so its arguments always validate. ``parallel_tool_calls=False`` keeps the first
        call only.
        """
        formatted = convert_tools(tools)
        normalize_tool_choice(tool_choice, formatted)  # fail here, at bind time, on a bad value
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Method = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """A runnable that answers with an object of ``schema`` (a pydantic class gives instances, else dicts).

        ``method``: "json_schema" (default; the reply is constrained to the schema), "function_calling" (a forced
        tool call), or "json_mode" (any JSON object; say the keys in the prompt). With ``include_raw=True`` the
        result is ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported argument(s) {sorted(kwargs)}")
        return structured_runnable(self, schema, method, include_raw, strict)
