"""LlamaIndex's integration namespace: ``from llama_index.llms.optimum_nvidia import OptimumNvidiaLLM``.

The same class as ``llamaindex_optimum_nvidia.OptimumNvidiaLLM`` (one implementation, two import paths); both come
with the ``llama-index-llms-optimum-nvidia`` distribution.
"""
from llamaindex_optimum_nvidia import OptimumNvidiaLLM

__all__ = ["OptimumNvidiaLLM"]
