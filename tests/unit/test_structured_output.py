"""LangChain with_structured_output on a recursive pydantic model: the grammar is that model's own schema, so every
output is that model (LangChain's converters replace the recursive $ref with {}, which allowed any value)."""
from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from guided_walk import closing_tokens, decoder, random_walk, tokenizer  # noqa: F401
from langchain_optimum_nvidia import ChatOptimumNvidia
from optimum_nvidia_core.tool_calls import tool_call_schema


class Node(BaseModel):
    """A tree node."""

    name: str
    children: list["Node"] = []


def _grammar_schema(method: str) -> dict:
    """The schema ``with_structured_output(Node, method=method)`` has the engine generate under."""
    kwargs = ChatOptimumNvidia().with_structured_output(Node, method=method).first.kwargs
    if "tools" in kwargs:  # function_calling: a call forced to the tool made from the model
        return tool_call_schema(kwargs["tools"], kwargs["tool_choice"])
    return kwargs["guided_json"]


@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_a_recursive_model_keeps_its_recursion(method):
    sent = json.dumps(_grammar_schema(method))
    assert '"$ref"' in sent and '"items": {}' not in sent


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_every_output_under_the_grammar_is_that_model(decoder, tokenizer, closing_tokens, method):
    schema = _grammar_schema(method)
    for seed in range(8):
        text = random_walk(decoder, tokenizer, schema, seed, [(closing_tokens, 0.5)], max_steps=600)
        value = json.loads(text)
        Node.model_validate(value["arguments"] if method == "function_calling" else value)
