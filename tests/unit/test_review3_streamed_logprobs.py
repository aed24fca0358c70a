"""Review 3: a streamed /v1/completions answer with logprobs carries one entry per generated token, as the
non-streamed answer does. Tokens whose text the detokenizer holds back (a character whose bytes span tokens, the
start of a possible stop string) came in deltas with no text, and those deltas were dropped whole, their
log-probabilities with them."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
from optimum_nvidia_core.llm import LLM  # noqa: E402
from optimum_nvidia_core.server.protocol import CompletionRequest  # noqa: E402
from optimum_nvidia_core.server.serving import OpenAIServing  # noqa: E402


@pytest.fixture(scope="module")
def serving(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=256, engine_process=False)
    yield OpenAIServing(llm, "tiny")
    llm.shutdown()


async def _items(serving, body):
    return [item async for item in serving.completions(CompletionRequest.model_validate(body))]


@pytest.mark.parametrize("stop", [None, ["a", "e", " "]])  # held-back text: partial characters, partial stops
def test_streamed_logprobs_cover_every_token(serving, stop):
    body = {"prompt": [5, 6, 7, 8, 9, 10], "max_tokens": 40, "temperature": 0, "logprobs": 1, "stop": stop}
    whole = asyncio.run(_items(serving, body))[-1]["choices"][0]
    chunks = asyncio.run(_items(serving, {**body, "stream": True}))
    streamed = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["text"] for c in streamed) == whole["text"]
    streamed_tokens = [t for c in streamed for t in (c["logprobs"] or {}).get("tokens", [])]
    assert streamed_tokens == whole["logprobs"]["tokens"]
    assert [o for c in streamed for o in c["logprobs"]["text_offset"]] == whole["logprobs"]["text_offset"]
