"""Optimum-NVIDIA core: a fast LLaMA-family engine (bf16/FP8, paged KV cache, in-flight batching, streaming)."""
from __future__ import annotations

from typing import Any

from .config import EngineConfig
from .hub import DEFAULT_MODEL
from .llm import LLM, collect, get_llm
from .outputs import Completion, Metrics, RequestOutput, ToolCall, Usage
from .request_stream import EngineError, RequestStream
from .sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AutoModelForCausalLM", "Completion", "DEFAULT_MODEL", "EngineConfig", "EngineError", "LLM", "Metrics",
    "RequestOutput", "RequestStream", "SamplingParams", "ToolCall", "Usage", "collect", "get_llm", "pipeline",
]


def __getattr__(name: str) -> Any:
    # The drop-in API pulls in more of transformers; load it only when asked for.
    if name == "AutoModelForCausalLM":
        from .modeling import AutoModelForCausalLM

        return AutoModelForCausalLM
    if name == "pipeline":
        from .pipelines import pipeline

        return pipeline
    raise AttributeError(f"module 'optimum_nvidia_core' has no attribute {name!r}")
