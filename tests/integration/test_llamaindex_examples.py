"""Smoke-run the LlamaIndex examples on the real SmolLM2 (CPU).

They run in this process through their ``main`` so that they share the engine the other LlamaIndex tests loaded
(the core's registry keys engines by model and options); a subprocess per example would load everything again.
"""
from __future__ import annotations

import runpy
from pathlib import Path

from llama_index.core import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name))  # run_name is not "__main__": defines main() without running it


def test_rag_example_streams_an_answer(capsys):
    saved = (Settings._llm, Settings._embed_model)
    try:
        answer = load_example("llamaindex_rag.py")["main"](max_tokens=32, device="cpu")
    finally:
        Settings._llm, Settings._embed_model = saved
    assert answer.strip()
    assert answer in capsys.readouterr().out


def test_agent_example_calls_its_tool(capsys):
    answer = load_example("llamaindex_agent.py")["main"](max_tokens=32, device="cpu")
    printed = capsys.readouterr().out
    assert "[tool] count_stock" in printed and "There are 42" in printed
    assert "42" in answer
