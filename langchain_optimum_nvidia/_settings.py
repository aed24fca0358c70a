"""LangChain's side of the shared fields: argument checks at construction, cache keys and LangSmith params.

The fields themselves (engine and sampling options, with their docs), the shared-engine handles, sampling params
and the tokenizer come from the core's ``optimum_nvidia_core.plugin_options.PluginOptions``, which the LlamaIndex
plugin uses too. No engine logic lives here.
"""
from __future__ import annotations

from typing import Any, Literal

from langchain_core.language_models.base import LangSmithParams

from optimum_nvidia_core.plugin_options import SAMPLING_FIELDS, PluginOptions

PROVIDER = "optimum_nvidia"  # ls_provider in traces, model_provider in response_metadata
# Arguments that remote-API chat models take and generic code passes to any model (init_chat_model, the
# langchain-tests suites). A local engine has no key, endpoint, network timeout or retries: they are dropped.
REMOTE_API_ARGS = frozenset({"api_key", "base_url", "timeout", "request_timeout", "max_retries"})


class OptimumNvidiaFields(PluginOptions):
    """The shared engine and sampling fields, plus what LangChain asks of every model."""

    ignored_arguments = REMOTE_API_ARGS

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
