"""The LangChain plugin on a real engine with a tiny random LLaMA (CPU): streaming contract, callbacks, batching
into one in-flight batch, aborts, and grammar-constrained tool calls / structured output (valid even from random
weights, because decoding is constrained)."""
from __future__ import annotations

import asyncio
import json
from typing import Literal

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from langchain_optimum_nvidia import ChatOptimumNvidia, OptimumNvidia
from engine_idle import wait_idle

# ignore_eos: random weights may pick EOS at once; the tests want a known number of tokens.
TEXT = {"ignore_eos": True}


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def paint(color: Literal["red", "green", "blue"], glossy: bool) -> str:
    """Paint the wall."""
    return f"painted {color}"


# Bounded argument types (enum, bool): random weights under a grammar could otherwise write a 60-digit integer.
class Verdict(BaseModel):
    """A verdict on a claim."""

    correct: bool
    color: Literal["red", "green", "blue"]


class TokenCounter(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token, **kwargs) -> None:
        self.tokens.append(token)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The shared tiny Llama with a 2048-token context: the tiny tokenizer spends ~470 tokens on a tools section."""
    from tiny_models import write_tiny_checkpoint, write_tiny_tokenizer
    from transformers import GenerationConfig

    out_dir = tmp_path_factory.mktemp("tiny_llama_2k")
    write_tiny_checkpoint(out_dir, "llama3", seed=0, max_position_embeddings=2048)
    write_tiny_tokenizer(out_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(str(out_dir))
    return out_dir


def _options(tiny_dir, **extra):
    # max_batch_size also names the engine: tests that count batched steps get an engine of their own.
    return {"model": str(tiny_dir), "device": "cpu", "temperature": 0, "max_tokens": 8,
            "model_kwargs": {"block_size": 4}, "max_seq_len": 1024, **extra}


@pytest.fixture(scope="module")
def chat(tiny_dir):
    model = ChatOptimumNvidia(**_options(tiny_dir))
    yield model
    model.get_llm().shutdown()


def test_stream_contract(chat):
    chunks = list(chat.stream("Paris is", **TEXT))
    assert len([c for c in chunks if c.content]) >= 2  # really streamed, token by token
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
    assert chunks[-1].chunk_position == "last"
    usage = with_usage[0].usage_metadata
    assert usage["output_tokens"] == 8 and usage["input_tokens"] > 3
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    full = sum(chunks[1:], chunks[0])
    assert full.response_metadata["model_name"] == chat.model_id
    assert full.response_metadata["finish_reason"] == "length"
    assert full.content == chat.invoke("Paris is", **TEXT).content  # greedy: the fold equals the stream


async def test_astream_matches_stream(chat):
    sync_text = "".join(c.content for c in chat.stream([HumanMessage("The fox")], **TEXT))
    async_text = "".join([c.content async for c in chat.astream([HumanMessage("The fox")], **TEXT)])
    assert async_text == sync_text and async_text


def test_invoke_reports_every_token_to_callbacks(chat):
    counter = TokenCounter()
    message = chat.invoke("Berlin is", config={"callbacks": [counter]}, **TEXT)
    assert "".join(counter.tokens) == message.content
    assert len([t for t in counter.tokens if t]) >= 2


def test_batch_and_abatch_share_one_in_flight_batch(tiny_dir):
    model = ChatOptimumNvidia(**_options(tiny_dir, max_batch_size=7))
    llm = model.get_llm()
    try:
        prompts = [f"Question {i}: what is {i} + {i}?" for i in range(6)]
        alone = [model.invoke(p, **TEXT).content for p in prompts[:2]]
        assert llm.stats()["max_running_seqs"] == 1
        together = model.batch(prompts, **TEXT)
        assert [m.content for m in together[:2]] == alone
        assert llm.stats()["max_running_seqs"] >= 3  # the batch's requests decoded in the same steps
        results = asyncio.run(model.abatch(prompts, **TEXT))
        assert [m.content for m in results] == [m.content for m in together]
    finally:
        llm.shutdown()


def test_breaking_out_of_a_stream_aborts_the_request(chat):
    llm = chat.get_llm()
    for i, _chunk in enumerate(chat.stream("Once upon a time", max_tokens=200, **TEXT)):
        if i == 2:
            break
    stats = wait_idle(llm)
    assert stats["running_requests"] == 0 and stats["free_blocks"] == stats["total_blocks"]


def test_forced_tool_call_is_valid_even_from_random_weights(chat):
    bound = chat.bind_tools([add, paint], tool_choice="paint", max_tokens=64)
    message = bound.invoke("Paint the wall green.")
    assert isinstance(message, AIMessage) and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "paint" and call["id"]
    assert call["args"]["color"] in ("red", "green", "blue") and isinstance(call["args"]["glossy"], bool)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    streamed = None
    for chunk in bound.stream("Paint the wall green."):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]


def _tool_history(args: dict, result: str) -> list:
    return [
        SystemMessage("You add numbers."),
        HumanMessage("What is 2 plus 3?"),
        AIMessage("", tool_calls=[{"name": "add", "args": args, "id": "call_1", "type": "tool_call"}]),
        ToolMessage(result, tool_call_id="call_1", name="add"),
    ]


def test_tool_history_round_trips(chat):
    bound = chat.bind_tools([add])

    def prompt_tokens(messages) -> int:
        return bound.invoke(messages, max_tokens=1, **TEXT).usage_metadata["input_tokens"]

    base = prompt_tokens(_tool_history({"a": 2, "b": 3}, "5"))
    # The prompt grows with what the call and the result say, so both reached it (not only the turns' markers).
    assert prompt_tokens(_tool_history({"a": 2222222222, "b": 3}, "5")) > base
    assert prompt_tokens(_tool_history({"a": 2, "b": 3}, "5, the sum of two and three")) > base
    assert base > prompt_tokens(_tool_history({"a": 2, "b": 3}, "5")[:2])
    answer = bound.invoke(_tool_history({"a": 2, "b": 3}, "5"), **TEXT)
    assert isinstance(answer, AIMessage) and answer.usage_metadata["input_tokens"] == base


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_is_always_valid(tiny_dir, method):
    chat = ChatOptimumNvidia(**_options(tiny_dir, max_tokens=64))  # same engine options: the shared engine
    assert isinstance(chat.with_structured_output(Verdict, method=method).invoke("Is the sky green?"), Verdict)
    raw = chat.with_structured_output(Verdict, method=method, include_raw=True)
    result = raw.invoke("Is the sky green?")
    assert isinstance(result["raw"], AIMessage) and isinstance(result["parsed"], Verdict)
    assert result["parsing_error"] is None


def test_json_mode_gives_a_json_object(tiny_dir):
    chat = ChatOptimumNvidia(**_options(tiny_dir, max_tokens=64))
    result = chat.with_structured_output(None, method="json_mode", include_raw=True).invoke("Reply in JSON.")
    raw, parsed = result["raw"], result["parsed"]
    assert result["parsing_error"] is None
    assert raw.response_metadata["finish_reason"] == "stop"  # the grammar closed the object before max_tokens
    assert isinstance(parsed, dict) and json.loads(raw.content) == parsed  # the whole reply is that one object
    assert chat.with_structured_output(None, method="json_mode").invoke("Reply in JSON.") == parsed  # greedy


def test_token_ids_use_the_models_tokenizer(chat):
    tokenizer = chat.get_llm().tokenizer
    assert chat.get_token_ids("The quick brown fox") == tokenizer.encode("The quick brown fox",
                                                                         add_special_tokens=False)
    fresh = ChatOptimumNvidia(model=chat.model_id)  # no engine yet: the tokenizer is read from the model files
    assert fresh.get_num_tokens("The quick brown fox") == len(chat.get_token_ids("The quick brown fox"))


def test_llm_invoke_stream_batch(tiny_dir, chat):
    llm = OptimumNvidia(**_options(tiny_dir))  # same options: shares the chat model's engine
    prompts = ["The quick", "Paris is the", "def add(a, b):"]
    text = llm.invoke(prompts[0], **TEXT)
    pieces = list(llm.stream(prompts[0], **TEXT))
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces) == text
    assert llm.batch(prompts, **TEXT) == [llm.invoke(p, **TEXT) for p in prompts]
    assert asyncio.run(llm.abatch(prompts, **TEXT)) == llm.batch(prompts, **TEXT)
    result = llm.generate([prompts[1]], **TEXT)
    info = result.generations[0][0].generation_info
    assert info["finish_reason"] == "length" and info["usage"]["output_tokens"] == 8
