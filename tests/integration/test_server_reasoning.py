"""Reasoning text through the server: a DeepSeek-R1-distill family model (its real chat template opens <think>
in the generation prompt; tiny random weights, CPU), so a reply cut off before </think> is all reasoning. The
server returns it as ``reasoning_content`` and ``reasoning`` (vLLM's and OpenRouter's names), whole and streamed,
and keeps it out of ``content``."""
from __future__ import annotations

import openai
import pytest

from chat_families import write_family_model
from live_server import LiveServer
from optimum_nvidia_core.server.local_engine import LocalEngine

QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir = write_family_model(tmp_path_factory.mktemp("r1"), "deepseek-r1-distill-llama", seed=2)
    engine = LocalEngine(str(model_dir), served_model_name="r1", device="cpu", max_seq_len=4096)
    with LiveServer(engine) as live:
        yield openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0)


def test_reasoning_is_returned_apart_from_the_content_whole_and_streamed(client):
    options = dict(model="r1", messages=QUESTION, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**options).choices[0]
    reasoning = whole.message.model_extra["reasoning_content"]
    assert reasoning and whole.message.model_extra["reasoning"] == reasoning
    assert not whole.message.content and whole.finish_reason == "length"
    chunks = list(client.chat.completions.create(**options, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [d.model_extra.get("reasoning_content") or "" for d in deltas]
    assert len([p for p in pieces if p]) >= 2  # streamed as it comes, not at the end
    assert "".join(pieces) == reasoning and not "".join(d.content or "" for d in deltas)
