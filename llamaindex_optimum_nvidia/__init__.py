"""LlamaIndex plugin for Optimum-NVIDIA: ``OptimumNvidiaLLM``, a function-calling LLM with real async streaming."""
from __future__ import annotations

from .base import OptimumNvidiaLLM

__all__ = ["OptimumNvidiaLLM"]
