"""The engine and sampling options that both plugins expose as fields, and what they turn into.

``PluginOptions`` is a pydantic model that the LangChain and LlamaIndex classes inherit next to their framework's
base class (pydantic merges the fields), so both show the same fields with the same docs and errors. It only
turns fields and per-call arguments into core arguments: the engine comes from the core's shared registry
(``llm.get_llm``), so every object built on the same model and engine options shares one engine, one engine thread
and one in-flight batch. Pydantic only here: no LangChain or LlamaIndex import.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .hub import DEFAULT_MODEL
from .sampling_params import SamplingParams

# Engine options exposed as fields (same names as optimum_nvidia_core.config.EngineConfig).
ENGINE_FIELDS = ("use_fp8", "kv_cache_dtype", "max_batch_size", "max_seq_len", "calibration_dataset", "device")
# Sampling options exposed as fields (same names as SamplingParams).
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "max_tokens",
    "stop", "seed",
)


class PluginOptions(BaseModel):
    """Engine and sampling fields; a field left at None uses the engine's / SamplingParams' default."""

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
    repetition_penalty: float | None = Field(
        None, gt=0.0, description="> 1 discourages tokens already in the prompt or the output."
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="> 0 discourages tokens already in the output (OpenAI semantics)."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="> 0 discourages tokens in proportion to their count in the output."
    )
    max_tokens: int | None = Field(None, ge=1, description="Most new tokens; None: the core's default (256).")
    stop: list[str] | None = Field(None, description="Stop strings; matched across tokens and never emitted.")
    seed: int | None = Field(None, ge=0, description="Same seed, same output, whatever batch the request shares.")

    # model id (this object's, or a per-call override) -> the shared core LLM handle
    _llm_handles: dict[str, Any] = PrivateAttr(default_factory=dict)

    def __deepcopy__(self, memo: dict | None = None) -> "PluginOptions":
        """A copy with its own fields that shares the engine handles: engines are shared per process anyway, and
        a handle (threads, queues) cannot be copied. LangChain and LlamaIndex deep-copy models (configs, agents)."""
        memo = {} if memo is None else memo
        memo[id(self._llm_handles)] = dict(self._llm_handles)
        return super().__deepcopy__(memo)

    # ---- engine ----------------------------------------------------------------------------------------
    def engine_options(self) -> dict[str, Any]:
        """Options for ``get_llm``; None means "the engine's default" and is left out."""
        options = {name: getattr(self, name) for name in ENGINE_FIELDS if getattr(self, name) is not None}
        return {**options, **self.model_kwargs}

    def get_llm(self, model: str | None = None) -> Any:
        """The shared core ``LLM`` for this model (or a per-call override); loads the engine on first use."""
        from .llm import get_llm

        model = model or self.model_id
        handle = self._llm_handles.get(model)
        if handle is None:
            handle = get_llm(model, **self.engine_options())
            self._llm_handles[model] = handle
        return handle

    async def aget_llm(self, model: str | None = None) -> Any:
        """``get_llm`` for async code: the one-time engine load (seconds) runs off the event loop."""
        if not self.has_llm(model):
            await asyncio.to_thread(self.get_llm, model)
        return self.get_llm(model)

    def has_llm(self, model: str | None = None) -> bool:
        return (model or self.model_id) in self._llm_handles

    # ---- sampling --------------------------------------------------------------------------------------
    def sampling_params(self, stop: list[str] | None, overrides: dict[str, Any]) -> SamplingParams:
        """SamplingParams from the fields, then per-call overrides (any SamplingParams field), then ``stop``.

        Raises a ValueError naming the argument when a call passes something that is not a sampling option.
        """
        unknown = sorted(set(overrides) - set(SamplingParams.model_fields))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} got unknown generation argument(s) {unknown}; a call accepts "
                f"SamplingParams fields ({', '.join(SamplingParams.model_fields)}) and, for chat, tools and "
                "tool_choice"
            )
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if stop is not None:
            values["stop"] = stop
        return SamplingParams(**values)

    # ---- tokenizer -------------------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        """The model's own tokenizer: the running engine's, else loaded from the local model files."""
        if self.has_llm():
            return self.get_llm().tokenizer
        return _load_tokenizer(self.model_id)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's tokenizer (never a download of another tokenizer)."""
        return list(self.tokenizer().encode(text, add_special_tokens=False))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(model_id: str) -> Any:
    from transformers import AutoTokenizer

    from .hub import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(model_id)))
