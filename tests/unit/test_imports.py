"""Each package's public names, pinned (as langchain-ollama pins its ``__all__``): removing or renaming one breaks
users, so it must be a deliberate change of this list."""
from __future__ import annotations

import importlib

import pytest

EXPECTED_ALL = {
    "optimum_nvidia_core": [
        "AutoModelForCausalLM", "Completion", "DEFAULT_MODEL", "EngineConfig", "EngineError", "LLM", "Metrics",
        "RequestOutput", "RequestStream", "SamplingParams", "ToolCall", "Usage", "collect", "get_llm", "pipeline",
    ],
    "langchain_optimum_nvidia": ["ChatOptimumNvidia", "OptimumNvidia"],
    "llamaindex_optimum_nvidia": ["OptimumNvidiaLLM"],
    "llama_index.llms.optimum_nvidia": ["OptimumNvidiaLLM"],
}


@pytest.mark.parametrize("package", sorted(EXPECTED_ALL))
def test_all_is_pinned_and_every_name_resolves(package):
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(EXPECTED_ALL[package])
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_both_llamaindex_import_paths_give_the_same_class():
    from llama_index.llms.optimum_nvidia import OptimumNvidiaLLM as namespaced
    from llamaindex_optimum_nvidia import OptimumNvidiaLLM

    assert namespaced is OptimumNvidiaLLM
