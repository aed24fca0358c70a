"""Guided requests in the engine (tiny random model, CPU): a grammar compiles in the pool while the other requests
keep producing tokens, outputs follow their grammar, and logprobs come back with the constrained tokens."""
from __future__ import annotations

import json
import threading

import pytest

from engine_idle import wait_idle
from optimum_nvidia_core import LLM, SamplingParams
from optimum_nvidia_core.guided import GuidedDecoder

pytest.importorskip("xgrammar")

LARGE_ENUM = [f"value_{i}" for i in range(20000)]  # ~16 s to compile with the tiny vocabulary (issue 15 item 5)
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "ok": {"type": "boolean"}}, "required": ["x", "ok"]}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=512)
    yield llm
    llm.shutdown()


def test_requests_keep_running_while_a_grammar_compiles(tiny_llama_dir, monkeypatch):
    """Deterministic: the compile waits for the test's go, so the others can only finish if nothing waits for it."""
    go = threading.Event()
    compile_for_real = GuidedDecoder.compiled_grammar

    def compile_when_told(self, json_schema):
        go.wait(120)  # were the engine blocked on this compile, the generate below would wait this long, then fail
        return compile_for_real(self, json_schema)

    monkeypatch.setattr(GuidedDecoder, "compiled_grammar", compile_when_told)
    llm = LLM(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=512, engine_process=False)
    try:
        guided = llm.stream([5, 6, 7], SamplingParams(max_tokens=48, temperature=0.0, guided_json=POINT))
        others = llm.generate([[8, 9, 10], [11, 12]], SamplingParams(max_tokens=16, temperature=0.0,
                                                                     ignore_eos=True))
        assert [len(o.token_ids) for o in others] == [16, 16]
        assert llm.stats()["awaiting_grammar"] == 1 and not go.is_set()
        go.set()
        assert set(json.loads("".join(d.text for d in guided))) == {"x", "ok"}
    finally:
        go.set()
        llm.shutdown()


def test_a_20000_value_enum_compiles_while_other_requests_keep_producing_tokens(llm):
    schema = {"type": "object", "properties": {"v": {"enum": LARGE_ENUM}}, "required": ["v"]}
    guided = llm.stream([5, 6, 7], SamplingParams(max_tokens=64, temperature=0.0, guided_json=schema))
    others = llm.generate([[8, 9, 10], [11, 12]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in others] == [8, 8]
    assert llm.stats()["awaiting_grammar"] == 1  # the others finished while its grammar was still compiling
    deltas = list(guided)
    assert deltas[-1].finish_reason == "stop"
    assert json.loads("".join(d.text for d in deltas))["v"] in LARGE_ENUM
    assert wait_idle(llm)["awaiting_grammar"] == 0


def test_guided_completions_follow_their_grammar_with_logprobs(llm):
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=3, n=2, logprobs=2, guided_json=POINT)
    out = llm.generate([[20, 21, 22]], params)[0]
    assert len(out.choices) == 2
    for choice in out.choices:
        value = json.loads(choice.text)
        assert set(value) == {"x", "ok"} and 0 <= value["x"] <= 99 and isinstance(value["ok"], bool)
        assert len(choice.logprobs) == len(choice.token_ids)
        for token, top in zip(choice.token_ids, choice.logprobs):
            assert token in top and all(v <= 0.0 for v in top.values())


def test_a_request_aborted_while_its_grammar_compiles_leaves_nothing_behind(llm):
    schema = {"type": "object", "properties": {"w": {"enum": LARGE_ENUM[:5000]}}, "required": ["w"]}
    stream = llm.stream([5, 6, 7], SamplingParams(max_tokens=8, guided_json=schema))
    stream.close()
    stats = wait_idle(llm)
    assert stats["awaiting_grammar"] == 0 and stats["running_requests"] == 0
    after = llm.generate([[9, 9, 9]], SamplingParams(max_tokens=48, temperature=0.0, guided_json=POINT))[0]
    assert set(json.loads(after.text)) == {"x", "ok"}  # still serving guided requests
