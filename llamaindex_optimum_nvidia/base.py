"""OptimumNvidiaLLM: a LlamaIndex FunctionCallingLLM served by the Optimum-NVIDIA core's in-flight batched engine.

Every call goes through the core's public facade (the shared ``LLM`` from ``PluginOptions.get_llm``): chat messages
through the model's chat template (``LLM.chat_stream``), tools into the prompt, tool calls parsed by the core, forced
calls constrained by its grammar. The engine is shared per (model, engine options) inside the process, so concurrent async calls (agents,
query engines, ``asyncio.gather``) share one in-flight batch. Async methods read the core's asyncio streams directly:
no thread per request, and the event loop never waits on the model.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

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
from llama_index.core.bridge.pydantic import Field
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from optimum_nvidia_core.outputs import RequestOutput
from optimum_nvidia_core.plugin_options import PluginOptions
from optimum_nvidia_core.sampling_params import SamplingParams

from .messages import (
    achat_responses,
    arefuse_cut_off,
    acompletion_responses,
    chat_responses,
    completion_responses,
    keep_first_tool_call,
    refuse_cut_off,
    to_chat_dicts,
    to_tool_choice,
    to_tool_specs,
    tool_selections,
)


class OptimumNvidiaLLM(PluginOptions, FunctionCallingLLM):
    """A LLaMA-family model (bf16 or FP8) for LlamaIndex RAG pipelines and agents.

    >>> from llama_index.core import Settings
    >>> Settings.llm = OptimumNvidiaLLM(model="HuggingFaceTB/SmolLM2-135M-Instruct", max_tokens=128)

    Per-call keyword arguments (``llm.complete(prompt, temperature=0, max_tokens=8)``) override the sampling fields
    with any ``optimum_nvidia_core.SamplingParams`` field. The engine loads on first use (or first ``metadata``).
    The engine and sampling fields (and ``get_llm``, ``sampling_params``, ``get_token_ids``) are the core's
    ``PluginOptions``, shared with the LangChain plugin.
    """

    # LlamaIndex's serialized form names the class; it is not an option.
    ignored_arguments = frozenset({"class_name"})

    # ---- completion ----
    complete_with_chat_template: bool = Field(
        True,
        description="complete()/stream_complete() send the prompt as one user message through the chat template "
        "(instruct models answer it); False, or formatted=True, sends the text raw for plain continuation.",
    )

    @classmethod
    def class_name(cls) -> str:
        return "OptimumNvidiaLLM"

    # ---- engine ------------------------------------------------------------------------------------------
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
        return {"messages": messages, "tools": specs or None, "tool_choice": choice,
                "parallel_tool_calls": allow_parallel_tool_calls, **kwargs}

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
        tools, tool_choice, parallel, params = self._chat_arguments(kwargs)
        deltas = llm.chat_stream(to_chat_dicts(messages), params, tools=tools, tool_choice=tool_choice,
                                 parallel_tool_calls=parallel)
        return refuse_cut_off(deltas, params, tool_choice)

    def _achat_deltas(self, llm: Any, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
                      ) -> AsyncIterator[RequestOutput]:
        tools, tool_choice, parallel, params = self._chat_arguments(kwargs)
        deltas = llm.achat_stream(to_chat_dicts(messages), params, tools=tools, tool_choice=tool_choice,
                                  parallel_tool_calls=parallel)
        return arefuse_cut_off(deltas, params, tool_choice)

    def _chat_arguments(self, kwargs: dict[str, Any]) -> tuple[list[dict] | None, Any, bool, SamplingParams]:
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        tool_choice = to_tool_choice(kwargs.pop("tool_choice", None), tool_required=False)
        parallel = kwargs.pop("parallel_tool_calls", True)
        return tools, tool_choice, parallel, self.sampling_params(None, kwargs)

    def _completion_deltas(self, llm: Any, prompt: str, formatted: bool, kwargs: dict[str, Any]
                           ) -> Iterator[RequestOutput]:
        params = self.sampling_params(None, kwargs)
        if formatted or not self.complete_with_chat_template:
            return iter(llm.stream(prompt if formatted else self.completion_to_prompt(prompt), params))
        return llm.chat_stream(self._completion_messages(prompt), params)

    def _acompletion_deltas(self, llm: Any, prompt: str, formatted: bool, kwargs: dict[str, Any]
                            ) -> AsyncIterator[RequestOutput]:
        params = self.sampling_params(None, kwargs)
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
