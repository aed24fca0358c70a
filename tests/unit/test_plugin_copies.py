"""`copy.deepcopy` of a used plugin model (LangChain and LlamaIndex copy models when they build agents and
configs): the copy has its own fields, shares the running engine, and answers the same (issue 15, item 12)."""
from __future__ import annotations

import copy

import pytest

from langchain_optimum_nvidia import ChatOptimumNvidia, OptimumNvidia
from llamaindex_optimum_nvidia import OptimumNvidiaLLM


def _answer(model) -> str:
    if isinstance(model, OptimumNvidiaLLM):
        return model.complete("Hi").text
    answer = model.invoke("Hi")
    return answer if isinstance(answer, str) else answer.content


@pytest.mark.parametrize("cls", [ChatOptimumNvidia, OptimumNvidia, OptimumNvidiaLLM])
def test_deepcopy_of_a_used_model_shares_the_engine_and_answers_the_same(tiny_llama_dir, cls):
    model = cls(model=str(tiny_llama_dir), device="cpu", max_tokens=4, temperature=0.0)
    first = _answer(model)  # the engine is loaded: the model now holds an engine handle
    clone = copy.deepcopy(model)
    assert _answer(clone) == first
    assert clone.get_llm() is model.get_llm()  # one engine, one in-flight batch
    clone.max_tokens = 2
    assert model.max_tokens == 4  # fields are the copy's own
    assert clone._llm_handles is not model._llm_handles  # a handle the copy adds stays the copy's
    model.get_llm().shutdown()
