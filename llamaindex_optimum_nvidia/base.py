"""OptimumNvidiaLLM: a LlamaIndex FunctionCallingLLM served by the Optimum-NVIDIA core's in-flight batched engine.

Every call goes through the core's public facade (``optimum_nvidia_core.get_llm``): chat messages through the model's
chat template (``LLM.chat_stream``), tools into the prompt, tool calls parsed by the core, forced calls constrained by
its grammar. The engine is shared per (model, engine options) inside the process, so concurrent async calls (agents,
query engines, ``asyncio.gather``) share one in-flight batch. Async methods read the core's asyncio streams directly:
no thread per request, and the event loop never waits on the model.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from optimum_nvidia_core.hub import DEFAULT_MODEL
from optimum_nvidia_core.outputs import RequestOutput
from optimum_nvidia_core.sampling_params import SamplingParams

from .messages import (
    achat_responses,
    acompletion_responses,
    chat_responses,
    completion_responses,
    keep_first_tool_call,
    to_chat_dicts,
    to_tool_choice,
    to_tool_specs,
    tool_selections,
)

# Same field names as the LangChain plugin (and as optimum_nvidia_core's EngineConfig / SamplingParams).
ENGINE_FIELDS = ("use_fp8", "kv_cache_dtype", "max_batch_size", "max_seq_len", "calibration_dataset", "device")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "stop", "seed")


class OptimumNvidiaLLM(FunctionCallingLLM):
    """A LLaMA-family model (bf16 or FP8) for LlamaIndex RAG pipelines and agents.

    >>> from llama_index.core import Settings
    >>> Settings.llm = OptimumNvidiaLLM(model="HuggingFaceTB/SmolLM2-135M-Instruct", max_tokens=128)

    Per-call keyword arguments (``llm.complete(prompt, temperature=0, max_tokens=8)``) override the sampling fields
    with any ``optimum_nvidia_core.SamplingParams`` field. The engine loads on first use (or first ``metadata``).
    """

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=(), arbitrary_types_allowed=True)

    model_id: str = Field(
        DEFAULT_MODEL, alias="model",
        description="Hugging Face model id, local checkpoint directory or engine directory (alias: model).",
    )
    # ---- engine options (part of the shared engine's identity) ----
    use_fp8: bool = Field(False, description="FP8 (e4m3) weights and activations; built once and cached.")
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="'fp8' stores the KV cache in e4m3.")
    max_batch_size: int | None = Field(None, ge=1, description="Most sequences in one engine step.")
    max_seq_len: int | None = Field(None, ge=16, description="Prompt + output tokens; default: the model's limit.")
    calibration_dataset: Any = Field(
        None, description="FP8 calibration text: strings, an iterable of strings or a datasets.Dataset."
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Other engine options passed to optimum_nvidia_core.LLM (e.g. num_kv_blocks, block_size, dtype).",
    )
    # ---- sampling ----
    temperature: float | None = Field(None, ge=0.0, description="0 is greedy; None: the core's default (1.0).")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=0, description="Sample among the k most likely tokens; 0 disables.")
    repetition_penalty: float | None = Field(None, gt=0.0, description="> 1 discourages repeated tokens.")
    max_tokens: int | None = Field(None, ge=1, description="Most new tokens; None: the core's default (256).")
    stop: list[str] | None = Field(None, description="Stop strings; matched across tokens and never emitted.")
    seed: int | None = Field(None, ge=0, description="Same seed, same output, whatever batch the request shares.")
    # ---- completion ----
    complete_with_chat_template: bool = Field(
        True,
        description="complete()/stream_complete() send the prompt as one user message through the chat template "
        "(instruct models answer it); False, or formatted=True, sends the text raw for plain continuation.",
    )

    _llm: Any = PrivateAttr(None)

    @classmethod
    def class_name(cls) -> str:
        return "OptimumNvidiaLLM"

    # ---- engine ------------------------------------------------------------------------------------------
    def engine_options(self) -> dict[str, Any]:
        """Options for ``get_llm``; a field left at None means "the engine's default" and is left out."""
        options = {name: getattr(self, name) for name in ENGINE_FIELDS if getattr(self, name) is not None}
        return {**options, **self.model_kwargs}

    def get_llm(self) -> Any:
        """The shared core ``optimum_nvidia_core.LLM``; loads (or builds) the engine on first use."""
        if self._llm is None:
            from optimum_nvidia_core.llm import get_llm

            self._llm = get_llm(self.model_id, **self.engine_options())
        return self._llm

    async def aget_llm(self) -> Any:
        """``get_llm`` for async code: the one-time engine load (seconds) runs off the event loop."""
        if self._llm is None:
            await asyncio.to_thread(self.get_llm)
        return self._llm

    @property
    def metadata(self) -> LLMMetadata:
        llm = self.get_llm()
        return LLMMetadata(
            context_window=llm.max_seq_len,
            num_output=self.max_tokens or SamplingParams.model_fields["max_tokens"].default,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=llm.model_name,
        )

    def sampling_params(self, overrides: dict[str, Any]) -> SamplingParams:
        """SamplingParams from the fields, then per-call overrides (any SamplingParams field)."""
        unknown = sorted(set(overrides) - set(SamplingParams.model_fields))
        if unknown:
            raise ValueError(
                f"OptimumNvidiaLLM got unknown argument(s) {unknown}; a call accepts SamplingParams fields "
                f"({', '.join(SamplingParams.model_fields)}) and, for chat, tools and tool_choice"
            )
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

    # ---- chat --------------------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _last(chat_responses(self.model_id, self._chat_deltas(self.get_llm(), messages, kwargs)))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return chat_responses(self.model_id, self._chat_deltas(self.get_llm(), messages, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        llm = await self.aget_llm()
        return await _alast(achat_responses(self.model_id, self._achat_deltas(llm, messages, kwargs)))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        llm = await self.aget_llm()
        return achat_responses(self.model_id, self._achat_deltas(llm, messages, kwargs))

    # ---- completion --------------------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        deltas = self._completion_deltas(self.get_llm(), prompt, formatted, kwargs)
        return _last(completion_responses(self.model_id, deltas))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        deltas = self._completion_deltas(self.get_llm(), prompt, formatted, kwargs)
        return completion_responses(self.model_id, deltas)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        llm = await self.aget_llm()
        deltas = self._acompletion_deltas(llm, prompt, formatted, kwargs)
        return await _alast(acompletion_responses(self.model_id, deltas))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any
                               ) -> CompletionResponseAsyncGen:
        llm = await self.aget_llm()
        deltas = self._acompletion_deltas(llm, prompt, formatted, kwargs)
        return acompletion_responses(self.model_id, deltas)

    # ---- tools -------------------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """chat() arguments: the history (+ user message), the tools as specs, and the tool choice.

        ``tool_required`` (or a named ``tool_choice``) forces a call: the core constrains the reply to a JSON call
        of a given tool under a grammar, so structured_predict and forced agent steps always parse.
        """
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        specs = to_tool_specs(tools)
        choice = to_tool_choice(tool_choice, tool_required) if specs else None
        return {"messages": messages, "tools": specs or None, "tool_choice": choice, **kwargs}

    def _validate_chat_with_tools_response(
        self, response: ChatResponse, tools: Sequence[Any], allow_parallel_tool_calls: bool = False, **kwargs: Any
    ) -> ChatResponse:
        return response if allow_parallel_tool_calls else keep_first_tool_call(response)

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = tool_selections(response.message)
        if not calls and error_on_no_tool_call:
            reply = (response.message.content or "")[:200]
            raise ValueError(
                f"expected a tool call, but the model replied with text only: {reply!r}. Pass tool_required=True "
                "(or tool_choice='<tool name>') to force a call, or error_on_no_tool_call=False to accept text."
            )
        return calls

    # ---- internals: core deltas in, LlamaIndex responses out --------------------------------------------
    def _chat_deltas(self, llm: Any, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
                     ) -> Iterator[RequestOutput]:
        tools, tool_choice, params = self._chat_arguments(kwargs)
        return llm.chat_stream(to_chat_dicts(messages), params, tools=tools, tool_choice=tool_choice)

    def _achat_deltas(self, llm: Any, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
                      ) -> AsyncIterator[RequestOutput]:
        tools, tool_choice, params = self._chat_arguments(kwargs)
        return llm.achat_stream(to_chat_dicts(messages), params, tools=tools, tool_choice=tool_choice)

    def _chat_arguments(self, kwargs: dict[str, Any]) -> tuple[list[dict] | None, str | None, SamplingParams]:
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        tool_choice = to_tool_choice(kwargs.pop("tool_choice", None), tool_required=False)
        return tools, tool_choice, self.sampling_params(kwargs)

    def _completion_deltas(self, llm: Any, prompt: str, formatted: bool, kwargs: dict[str, Any]
                           ) -> Iterator[RequestOutput]:
        params = self.sampling_params(kwargs)
        if formatted or not self.complete_with_chat_template:
            return iter(llm.stream(prompt if formatted else self.completion_to_prompt(prompt), params))
        return llm.chat_stream(self._completion_messages(prompt), params)

    def _acompletion_deltas(self, llm: Any, prompt: str, formatted: bool, kwargs: dict[str, Any]
                            ) -> AsyncIterator[RequestOutput]:
        params = self.sampling_params(kwargs)
        if formatted or not self.complete_with_chat_template:
            return llm.astream(prompt if formatted else self.completion_to_prompt(prompt), params)
        return llm.achat_stream(self._completion_messages(prompt), params)

    def _completion_messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": self.completion_to_prompt(prompt)}]


def _last(responses: Iterator[Any]) -> Any:
    last = None
    for last in responses:
        pass
    if last is None:
        raise RuntimeError("the engine ended the request without output (it was aborted); retry the call")
    return last


async def _alast(responses: AsyncIterator[Any]) -> Any:
    last = None
    async for last in responses:
        pass
    if last is None:
        raise RuntimeError("the engine ended the request without output (it was aborted); retry the call")
    return last
