"""Fields shared by ChatOptimumNvidia and OptimumNvidia: which engine to use and how to sample.

The engine itself comes from the core's shared registry (``optimum_nvidia_core.llm.get_llm``): every model object
built on the same model and engine options shares one engine, one engine thread and one in-flight batch.
No engine logic lives here; this module only turns LangChain-style fields and call kwargs into core arguments.
"""
from __future__ import annotations

import functools
from typing import Any, Literal

from langchain_core.language_models.base import LangSmithParams
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from optimum_nvidia_core.hub import DEFAULT_MODEL
from optimum_nvidia_core.sampling_params import SamplingParams

PROVIDER = "optimum_nvidia"  # ls_provider in traces, model_provider in response_metadata
# Engine options the plugins expose as fields (same names as optimum_nvidia_core.config.EngineConfig).
ENGINE_FIELDS = ("use_fp8", "kv_cache_dtype", "max_batch_size", "max_seq_len", "calibration_dataset", "device")
# Sampling options exposed as fields (same names as SamplingParams).
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "max_tokens",
    "stop", "seed",
)
# Arguments that remote-API chat models take and generic code passes to any model (init_chat_model, the
# langchain-tests suites). A local engine has no key, endpoint, network timeout or retries: they are dropped.
REMOTE_API_ARGS = frozenset({"api_key", "base_url", "timeout", "request_timeout", "max_retries"})


class OptimumNvidiaFields(BaseModel):
    """Engine and sampling fields; a sampling field left at None uses the core's SamplingParams default."""

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

    _llm_handles: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _check_arguments(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = {k: v for k, v in values.items() if k not in REMOTE_API_ARGS}
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__} got unknown argument(s) {unknown}. Engine options go in model_kwargs "
                f"(e.g. model_kwargs={{'num_kv_blocks': 512}}); sampling fields are {list(SAMPLING_FIELDS)}."
            )
        return values

    # ---- engine ----------------------------------------------------------------------------------------
    def engine_options(self) -> dict[str, Any]:
        """Options for ``get_llm``; None means "the engine's default" and is left out."""
        options = {name: getattr(self, name) for name in ENGINE_FIELDS if getattr(self, name) is not None}
        return {**options, **self.model_kwargs}

    def get_llm(self, model: str | None = None) -> Any:
        """The shared core ``LLM`` for this model (or a per-call override); loads the engine on first use."""
        from optimum_nvidia_core.llm import get_llm

        model = model or self.model_id
        handle = self._llm_handles.get(model)
        if handle is None:
            handle = get_llm(model, **self.engine_options())
            self._llm_handles[model] = handle
        return handle

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
                f"unknown generation argument(s) {unknown}; a call accepts SamplingParams fields "
                f"({', '.join(SamplingParams.model_fields)})"
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

    # ---- tracing ---------------------------------------------------------------------------------------
    def identifying_params(self) -> dict[str, Any]:
        """What identifies this model's outputs (LangChain's cache key and traces)."""
        params = {"model_id": self.model_id, **self.engine_options()}
        if self.calibration_dataset is not None:  # identify, do not embed, the data
            params["calibration_dataset"] = type(self.calibration_dataset).__name__
        return {**params, **{name: getattr(self, name) for name in SAMPLING_FIELDS}}

    def ls_params(self, model_type: Literal["chat", "llm"], stop: list[str] | None, kwargs: dict[str, Any]
                  ) -> LangSmithParams:
        """LangSmith's standard params; a per-call ``model=`` / sampling override wins over the field."""
        model = kwargs.get("model")
        params = LangSmithParams(ls_provider=PROVIDER, ls_model_type=model_type,
                                 ls_model_name=model if isinstance(model, str) else self.model_id)
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params


@functools.lru_cache(maxsize=8)
def _load_tokenizer(model_id: str) -> Any:
    from transformers import AutoTokenizer

    from optimum_nvidia_core.hub import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(model_id)))
