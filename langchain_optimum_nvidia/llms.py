"""OptimumNvidia: a LangChain text-completion LLM (raw prompt in, continuation out) on the shared engine.

``_stream`` / ``_astream`` read the core's streams; ``_generate`` / ``_agenerate`` fold them, running all prompts
of one call concurrently so that ``batch`` lands in one in-flight batch.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from optimum_nvidia_core.outputs import RequestOutput

from ._settings import OptimumNvidiaFields
from .messages import response_metadata, usage_metadata


class OptimumNvidia(OptimumNvidiaFields, BaseLLM):
    """Text completion with optimum-nvidia (no chat template: the prompt is sent as is).

    Example:
        .. code-block:: python

            from langchain_optimum_nvidia import OptimumNvidia

            llm = OptimumNvidia(model="HuggingFaceTB/SmolLM2-135M-Instruct", temperature=0, max_tokens=32)
            print(llm.invoke("The capital of France is"))
    """

    @property
    def _llm_type(self) -> str:
        return "optimum-nvidia"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.identifying_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self.ls_params("llm", stop, kwargs)

    # ---- the one real path -----------------------------------------------------------------------------
    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        model = kwargs.pop("model", None)
        params = self.sampling_params(stop, kwargs)
        deltas = self.get_llm(model).stream(prompt, params)
        try:
            for delta in deltas:
                chunk = _chunk(delta, model or self.model_id)
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            deltas.close()  # stopping early aborts the request

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        model = kwargs.pop("model", None)
        params = self.sampling_params(stop, kwargs)
        llm = await self.aget_llm(model)  # a first call loads the engine off the event loop
        deltas = llm.astream(prompt, params)
        try:
            async for delta in deltas:
                chunk = _chunk(delta, model or self.model_id)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await deltas.aclose()

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        def fold(prompt: str) -> Generation:
            return _fold(self._stream(prompt, stop=stop, run_manager=run_manager, **kwargs))

        if len(prompts) == 1:
            return LLMResult(generations=[[fold(prompts[0])]])
        self.get_llm(kwargs.get("model"))  # load once, before the threads race for it
        # One reader thread per prompt: the engine thread batches them; the readers only wait on their queues.
        with ThreadPoolExecutor(max_workers=len(prompts), thread_name_prefix="optimum-nvidia-reader") as pool:
            generations = list(pool.map(fold, prompts))
        return LLMResult(generations=[[g] for g in generations])

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        async def fold(prompt: str) -> Generation:
            chunks = [c async for c in self._astream(prompt, stop=stop, run_manager=run_manager, **kwargs)]
            return _fold(iter(chunks))

        generations = await asyncio.gather(*(fold(p) for p in prompts))
        return LLMResult(generations=[[g] for g in generations])


def _chunk(delta: RequestOutput, model_name: str) -> GenerationChunk:
    if not delta.finished:
        return GenerationChunk(text=delta.text)
    info = {**response_metadata(delta, model_name), "usage": dict(usage_metadata(delta.usage))}
    return GenerationChunk(text=delta.text, generation_info=info)


def _fold(chunks: Iterator[GenerationChunk]) -> Generation:
    total: GenerationChunk | None = None
    for chunk in chunks:
        total = chunk if total is None else total + chunk
    if total is None:
        raise RuntimeError("the engine returned no output for the prompt (the request was aborted)")
    return Generation(text=total.text, generation_info=total.generation_info)
