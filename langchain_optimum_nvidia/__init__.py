"""LangChain integration for optimum-nvidia: ``ChatOptimumNvidia`` (chat model) and ``OptimumNvidia`` (LLM).

Both run on the shared optimum-nvidia engine: one engine per (model, engine options) per process, so every
instance, thread and event loop using the same model joins one in-flight batch.
"""
from .chat_models import ChatOptimumNvidia
from .llms import OptimumNvidia

__all__ = ["ChatOptimumNvidia", "OptimumNvidia"]
