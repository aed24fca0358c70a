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


def test_three_distributions_each_plugin_on_the_core():
    """The root pyproject is the core; each plugin's pyproject ships its package(s) from this tree and needs the core."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    core = tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"]
    shipped = {}
    for project_dir in ("integrations/langchain", "integrations/llamaindex"):
        project = tomllib.loads((root / project_dir / "pyproject.toml").read_text())
        assert any(dep.split(">")[0].split("=")[0].strip() == core for dep in project["project"]["dependencies"])
        for package, path in project["tool"]["setuptools"]["package-dir"].items():
            assert ((root / project_dir / path).resolve() / "__init__.py").is_file(), package
            shipped[package] = project["project"]["name"]
    assert shipped == {"langchain_optimum_nvidia": "langchain-optimum-nvidia",
                       "llamaindex_optimum_nvidia": "llama-index-llms-optimum-nvidia",
                       "llama_index.llms.optimum_nvidia": "llama-index-llms-optimum-nvidia"}
