"""The engine and sampling options that both plugins expose as fields, and what they turn into.

The fields are generated from ``EngineConfig`` and ``SamplingParams`` (type, bounds, description), never declared
here, so a bound changed in the core changes in both plugins. ``PluginOptions`` is a pydantic model that the
LangChain and LlamaIndex classes inherit next to their framework's base class (pydantic merges the fields), so both
show the same fields with the same docs and errors. It only turns fields and per-call arguments into core
arguments: the engine comes from the core's shared registry (``llm.get_llm``), so every object built on the same
model and engine options shares one engine, one engine thread and one in-flight batch. Pydantic only here: no
LangChain or LlamaIndex import.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, PrivateAttr, create_model, model_validator
from pydantic.fields import FieldInfo

from .config import EngineConfig
from .hub import DEFAULT_MODEL
from .sampling_params import SamplingParams

# Engine options exposed as fields: EngineConfig's own declarations (type, default, bounds, docs).
ENGINE_FIELDS = ("use_fp8", "quantization", "int4_method", "kv_cache_dtype", "max_batch_size", "max_seq_len",
                 "calibration_dataset", "device")
# Sampling options exposed as fields: SamplingParams' declarations, defaulting to None ("the request's default").
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "max_tokens",
    "stop", "seed",
)


def _engine_field(name: str) -> tuple[Any, FieldInfo]:
    source = EngineConfig.model_fields[name]
    return source.annotation, FieldInfo.merge_field_infos(source)


def _sampling_field(name: str) -> tuple[Any, FieldInfo]:
    """SamplingParams' field with the same bounds and docs, but None by default: LangChain's convention, so a
    model's fields and its traces show only what the user chose."""
    source = SamplingParams.model_fields[name]
    default = source.get_default(call_default_factory=True)
    description = source.description if default is None else f"{source.description} Unset: {default!r}."
    return source.annotation | None, FieldInfo.merge_field_infos(
        source, default=None, default_factory=None, description=description
    )


# One declaration rules: the plugins' option fields are generated from the core's.
_CoreOptionFields = create_model(
    "_CoreOptionFields",
    __module__=__name__,
    **{name: _engine_field(name) for name in ENGINE_FIELDS},
    **{name: _sampling_field(name) for name in SAMPLING_FIELDS},
)


class PluginOptions(_CoreOptionFields):
    """Engine and sampling fields (see ENGINE_FIELDS and SAMPLING_FIELDS), validated as the core validates them."""

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=(), arbitrary_types_allowed=True)
    # Arguments a framework passes that are not options (dropped before the unknown-argument check).
    ignored_arguments: ClassVar[frozenset[str]] = frozenset()

    model_id: str = Field(
        DEFAULT_MODEL, alias="model",
        description="Hugging Face model id, local checkpoint directory or engine directory (alias: model).",
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Other engine options passed to optimum_nvidia_core.LLM (e.g. num_kv_blocks, block_size, dtype).",
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_arguments(cls, values: Any) -> Any:
        # pydantic would drop a misspelt option silently; a typo must not change what runs.
        if not isinstance(values, dict):
            return values
        values = {k: v for k, v in values.items() if k not in cls.ignored_arguments}
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__} got unknown argument(s) {unknown}. Engine options go in model_kwargs "
                f"(e.g. model_kwargs={{'num_kv_blocks': 512}}); sampling fields are {list(SAMPLING_FIELDS)}."
            )
        return values

    @model_validator(mode="after")
    def _check_with_the_core(self) -> "PluginOptions":
        # The core's own checks (cross-field ones, unknown model_kwargs), at construction rather than first use.
        EngineConfig(model=self.model_id, **self.engine_options())
        SamplingParams(**self._sampling_values())
        return self

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
        values = self._sampling_values()
        values.update({k: v for k, v in overrides.items() if v is not None})
        if stop is not None:
            values["stop"] = stop
        return SamplingParams(**values)

    def _sampling_values(self) -> dict[str, Any]:
        """The sampling fields that were set. None set explicitly reaches the core where None means something
        there (max_tokens=None: up to the context window); elsewhere None is the same as unset."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS
                if getattr(self, name) is not None or (name in self.model_fields_set and _core_accepts_none(name))}

    # ---- tokenizer -------------------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        """The model's own tokenizer: the running engine's, else loaded from the local model files."""
        if self.has_llm():
            return self.get_llm().tokenizer
        return _load_tokenizer(self.model_id)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's tokenizer (never a download of another tokenizer)."""
        return list(self.tokenizer().encode(text, add_special_tokens=False))


def _core_accepts_none(name: str) -> bool:
    field = SamplingParams.model_fields[name]
    return field.default is None or type(None) in getattr(field.annotation, "__args__", ())


@functools.lru_cache(maxsize=8)
def _load_tokenizer(model_id: str) -> Any:
    from transformers import AutoTokenizer

    from .hub import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(model_id)))
