"""Smoke-runs of examples/langchain_rag.py and examples/langchain_agent.py on SmolLM2 (CPU, offline).

Each example's main() runs in this process (so it shares the engine other integration tests loaded) with the
arguments a user would type, and its printed output is checked.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rag_example_streams_a_grounded_answer(capsys):
    rag = _load("langchain_rag")
    assert rag.main(["How is the Aurora-7 greenhouse heated?", "--max-tokens", "40", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q: How is the Aurora-7 greenhouse heated?\nA: ")
    answer = out.split("A: ", 1)[1].lower()
    assert any(word in answer for word in ("spring", "geotherm", "water"))  # only the retrieved document says so


def test_rag_retriever_finds_the_right_documents():
    rag = _load("langchain_rag")
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore.from_documents(rag.DOCUMENTS, rag.MiniLMEmbeddings())
    top = store.similarity_search("When can I visit and how much is a ticket?", k=1)[0]
    assert top.metadata["source"] == "visits"


def test_agent_example_calls_the_tool_and_answers(capsys):
    agent = _load("langchain_agent")
    assert agent.main(["What is the weather in Oslo?", "--max-tokens", "48", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "user: What is the weather in Oslo?"
    assert any(line.startswith("model: calls get_weather(") and "Oslo" in line for line in lines)
    assert any(line.startswith("tools: The weather in Oslo is light snow") for line in lines)
    final = lines[-1]
    assert final.startswith("model: ") and "calls" not in final and "light snow" in final  # uses the result
