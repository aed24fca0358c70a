"""Prompt-lookup speculative decoding in the engine (speculative="ngram"): the same tokens as plain decoding,
whatever ends a sequence inside an accepted run, with n > 1, mixed batches, grammars and penalties; KV blocks
of rejected tokens go back to the pool.

A random tiny model rarely repeats itself, so proposals are mostly rejected. "Looping" copies of it have their
attention output scaled down: with scale 0 each token's successor is a function of that token alone, so greedy
output falls into a cycle that prompt lookup predicts; a small scale keeps the context (and so the KV cache)
in play while still accepting many proposals.
"""
from __future__ import annotations

import json
import random
import shutil

import pytest
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from optimum_nvidia_core.config import EngineConfig
from optimum_nvidia_core.engine.core import EngineCore
from optimum_nvidia_core.engine.interface import EngineCoreRequest
from optimum_nvidia_core.llm import LLM
from optimum_nvidia_core.sampling_params import SamplingParams

ENGINE = dict(device="cpu", block_size=4, max_seq_len=512, max_batch_size=8)


def _looping_copy(src, dst, scale: float):
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for name in weights:
        if "o_proj" in name:
            weights[name] = weights[name] * scale
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def loop_dir(tiny_llama_dir, tmp_path_factory):
    return _looping_copy(tiny_llama_dir, tmp_path_factory.mktemp("spec") / "loop", 0.0)


@pytest.fixture(scope="module")
def context_dir(tiny_llama_dir, tmp_path_factory):
    return _looping_copy(tiny_llama_dir, tmp_path_factory.mktemp("spec") / "context", 0.2)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 30))] for _ in range(count - 1)]
    return prompts + [[5, 6, 7, 8, 9] * 5]  # one that repeats from the start


def _run(core: EngineCore, requests) -> dict:
    """Step (request_id, prompt, params) requests to the end -> {(request_id, index): (ids, finish, run lengths)}."""
    for request_id, prompt, params in requests:
        core.add_request(EngineCoreRequest(request_id, prompt, params))
    out: dict = {}
    for _ in range(5000):
        if not core.has_unfinished():
            break
        for o in core.step():
            assert o.error is None, o.error
            ids, _, runs = out.get((o.request_id, o.index), ([], None, []))
            out[(o.request_id, o.index)] = (ids + o.token_ids, o.finish_reason, runs + [len(o.token_ids)])
    assert not core.has_unfinished()
    return out


def _tokens(out: dict) -> dict:
    return {key: (ids, finish) for key, (ids, finish, _) in out.items()}


_ENGINES: dict = {}  # (model dir, options) -> (plain, speculative) cores, reused across tests (loading is slow)


def _engines(model_dir, speculative_options: dict | None = None, **options):
    """(plain, speculative) cores of the same engine options."""
    speculative_options = {"speculative": "ngram", **(speculative_options or {})}
    key = (str(model_dir), tuple(sorted(options.items())), tuple(sorted(speculative_options.items())))
    if key not in _ENGINES:
        _ENGINES[key] = tuple(EngineCore(EngineConfig(model=str(model_dir), **ENGINE, **options, **extra))
                              for extra in ({}, speculative_options))
    return _ENGINES[key]


@pytest.fixture(scope="module", autouse=True)
def _drop_engines():
    yield
    _ENGINES.clear()


def _assert_no_blocks_held(core: EngineCore):
    stats = core.stats()
    assert stats["free_blocks"] == stats["total_blocks"]
    assert all(b.ref_count == 0 for b in core.block_manager.blocks)


# ---- options -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, field", [
    (dict(speculative="eagle"), "speculative"),
    (dict(speculative="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(speculative="ngram", prompt_lookup_min=4, prompt_lookup_max=2), "prompt_lookup_min"),
    (dict(speculative="ngram", speculative_disable_by_batch_size=0), "speculative_disable_by_batch_size"),
    (dict(num_speculative_tokens=4), "num_speculative_tokens: options of speculative decoding, which is off; "
                                     "pass speculative='ngram'"),
])
def test_bad_speculative_options_name_the_field(options, field):
    with pytest.raises(ValidationError, match=field):
        EngineConfig(model="m", **options)


def test_a_dumped_config_loads_again():
    # model_dump() gives every field, speculative ones at their defaults: not "options given with speculation off".
    for config in (EngineConfig(model="m"), EngineConfig(model="m", speculative="ngram", num_speculative_tokens=4)):
        assert EngineConfig(**config.model_dump()) == config


def test_the_defaults_follow_vllm():
    config = EngineConfig(model="m", speculative="ngram")
    assert (config.num_speculative_tokens, config.prompt_lookup_max, config.prompt_lookup_min) == (8, 3, 1)
    assert EngineConfig(model="m").speculative is None


# ---- greedy equality -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["random", "context", "loop"])
def test_greedy_output_is_plain_greedy_token_for_token(which, tiny_llama_dir, context_dir, loop_dir):
    model_dir = {"random": tiny_llama_dir, "context": context_dir, "loop": loop_dir}[which]
    plain, spec = _engines(model_dir)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    requests = [(f"r{i}", p, params) for i, p in enumerate(_prompts(6))]
    expected, got = _tokens(_run(plain, requests)), _run(spec, requests)
    assert _tokens(got) == expected
    stats = spec.stats()
    assert stats["spec_proposals"] > 0
    if which != "random":  # proposals were accepted: a sequence took several tokens in one step
        assert max(max(runs) for _, _, runs in got.values()) > 1
    if which == "loop":  # most of them
        assert stats["spec_accepted_tokens"] > 0.3 * sum(len(ids) for ids, _ in expected.values())
        assert stats["steps"] < plain.stats()["steps"]
    _assert_no_blocks_held(spec)


def _cycling_context(plain: EngineCore, prompt: list[int]) -> tuple[list[int], list[int]]:
    """(a context in which the looping model's greedy output already cycles, the next 8 tokens it produces). With
    it, the first decode step already verifies a proposal copied from the context."""
    ids = _tokens(_run(plain, [("probe", prompt, SamplingParams(max_tokens=64, temperature=0.0,
                                                                  ignore_eos=True))]))[("probe", 0)][0]
    context, continuation = prompt + ids[:48], ids[48:56]
    assert len(set(continuation[:4])) == 4, "this prompt's cycle is too short for the test; pick another seed"
    return context, continuation


@pytest.mark.parametrize("max_tokens", [5, 13, 31])
def test_max_tokens_cuts_an_accepted_run(loop_dir, max_tokens):
    plain, spec = _engines(loop_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    requests = [(f"r{i}", p, params) for i, p in enumerate(_prompts(4, seed=1))]
    requests.append(("cycling", _cycling_context(plain, _prompts(3, seed=3)[0])[0], params))
    got = _run(spec, requests)
    assert _tokens(got) == _tokens(_run(plain, requests))
    assert all(len(ids) == max_tokens and finish == "length" for ids, finish, _ in got.values())
    assert got[("cycling", 0)][2][-1] > 1  # the last output was a run cut at max_tokens
    _assert_no_blocks_held(spec)


def test_a_stop_token_inside_an_accepted_run_ends_the_sequence_there(loop_dir):
    plain, spec = _engines(loop_dir)
    context, continuation = _cycling_context(plain, _prompts(3, seed=3)[0])
    params = SamplingParams(max_tokens=200, temperature=0.0, stop_token_ids=[continuation[3]])
    got = _run(spec, [("r", context, params)])[("r", 0)]
    assert (got[0], got[1]) == _tokens(_run(plain, [("r", context, params)]))[("r", 0)]
    # The first token comes from the prefill; the first verify step accepts a run that the stop token cuts.
    assert (got[0], got[1], got[2]) == (continuation[:4], "stop", [1, 3])
    _assert_no_blocks_held(spec)


def test_eos_inside_an_accepted_run_ends_the_sequence_there(loop_dir, tmp_path):
    plain, _ = _engines(loop_dir)
    context, continuation = _cycling_context(plain, _prompts(3, seed=3)[0])
    model_dir = shutil.copytree(loop_dir, tmp_path / "eos")
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, continuation[2]]}))
    plain, spec = _engines(model_dir)
    params = SamplingParams(max_tokens=200, temperature=0.0)
    got = _run(spec, [("r", context, params)])[("r", 0)]
    assert (got[0], got[1]) == _tokens(_run(plain, [("r", context, params)]))[("r", 0)]
    assert (got[0], got[1], got[2]) == (continuation[:3], "stop", [1, 2])
    _assert_no_blocks_held(spec)


# ---- n > 1, sampling, mixed batches ----------------------------------------------------------------------------
def test_n2_and_seeded_sampling_reproduce_plain_decoding(context_dir):
    plain, spec = _engines(context_dir)
    requests = [("greedy", _prompts(2)[1], SamplingParams(n=2, max_tokens=40, temperature=0.0, ignore_eos=True)),
                ("sampled", _prompts(2)[0], SamplingParams(n=2, max_tokens=37, temperature=0.7, top_p=0.9, seed=11,
                                                           ignore_eos=True)),
                ("top_k", [5, 6, 7] * 4, SamplingParams(max_tokens=25, temperature=1.3, top_k=20, seed=3,
                                                         ignore_eos=True))]
    accepted = spec.stats()["spec_accepted_tokens"]
    got = _tokens(_run(spec, requests))
    assert got == _tokens(_run(plain, requests))  # the same seeded draws at the same positions
    assert len(got[("sampled", 0)][0]) == len(got[("sampled", 1)][0]) == 37
    assert got[("sampled", 0)][0] != got[("sampled", 1)][0]
    assert spec.stats()["spec_accepted_tokens"] > accepted
    _assert_no_blocks_held(spec)


def test_steps_above_the_cutoff_run_plain_and_smaller_ones_speculate(context_dir):
    plain, spec = _engines(context_dir, {"speculative_disable_by_batch_size": 2})
    verify_sizes, plain_sizes = [], []
    launch = spec.runner.launch

    def recording_launch(batch, allowed=None):
        (verify_sizes if batch.draft_token_ids is not None else plain_sizes).append(len(batch.seqs))
        return launch(batch, allowed)

    spec.runner.launch = recording_launch
    requests = [(f"r{i}", p, SamplingParams(max_tokens=12 + 9 * i, temperature=0.0, ignore_eos=True))
                for i, p in enumerate(_prompts(5, seed=4))]
    assert _tokens(_run(spec, requests)) == _tokens(_run(plain, requests))
    assert verify_sizes and max(verify_sizes) <= 2
    assert max(plain_sizes) == 5
    _assert_no_blocks_held(spec)


def test_penalties_logprobs_and_min_tokens_keep_plain_output(context_dir):
    plain, spec = _engines(context_dir)
    requests = [("penalty", [5, 6, 7] * 5, SamplingParams(max_tokens=30, temperature=0.0, frequency_penalty=0.5,
                                                          repetition_penalty=1.2, ignore_eos=True)),
                ("logprobs", [9, 10, 11] * 5, SamplingParams(max_tokens=20, temperature=0.0, logprobs=2)),
                ("min_tokens", [12, 13] * 6, SamplingParams(max_tokens=30, temperature=0.0, min_tokens=10))]
    assert _tokens(_run(spec, requests)) == _tokens(_run(plain, requests))
    _assert_no_blocks_held(spec)


def test_a_guided_request_does_not_speculate_and_others_still_do(context_dir):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    plain, spec = _engines(context_dir)
    drafted = []
    launch = spec.runner.launch

    def recording_launch(batch, allowed=None):
        if batch.draft_token_ids is not None:
            drafted.extend(seq.request_id for seq, d in zip(batch.seqs, batch.draft_token_ids) if d)
        return launch(batch, allowed)

    spec.runner.launch = recording_launch
    requests = [("guided", [5, 6, 7], SamplingParams(max_tokens=24, temperature=0.0, guided_json=schema)),
                ("free", [5, 6, 7, 8] * 4, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))]
    assert _tokens(_run(spec, requests)) == _tokens(_run(plain, requests))
    assert "free" in drafted and "guided" not in drafted
    _assert_no_blocks_held(spec)


def test_blocks_of_rejected_tokens_are_given_back_under_a_small_cache(tiny_llama_dir):
    # 40 blocks of 4 tokens for 4 sequences of up to 50 tokens: speculation must not hold blocks it does not use.
    plain, spec = _engines(tiny_llama_dir, {"num_speculative_tokens": 8}, num_kv_blocks=40)
    requests = [(f"r{i}", p[:10], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
                for i, p in enumerate(_prompts(4, seed=5))]
    assert _tokens(_run(spec, requests)) == _tokens(_run(plain, requests))
    _assert_no_blocks_held(spec)


# ---- the public API: streaming and stop strings ----------------------------------------------------------------
@pytest.fixture(scope="module")
def llms(loop_dir):
    options = dict(device="cpu", block_size=4, max_seq_len=512, engine_process=False)
    plain, spec = LLM(str(loop_dir), **options), LLM(str(loop_dir), speculative="ngram", **options)
    yield plain, spec
    plain.shutdown()
    spec.shutdown()


def test_streamed_deltas_concatenate_to_plain_text(llms):
    plain, spec = llms
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    expected = plain.generate(["Paris is the capital of"], params)[0]
    deltas = list(spec.stream("Paris is the capital of", params))
    assert "".join(d.text for d in deltas) == expected.text
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert any(len(d.token_ids) > 1 for d in deltas)  # several tokens arrived in one delta
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 60


def test_a_stop_string_inside_an_accepted_run_cuts_text_and_tokens_like_plain(llms, loop_dir):
    plain, spec = llms
    context, _ = _cycling_context(_engines(loop_dir)[0], _prompts(3, seed=3)[0])
    text = plain.generate([context], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].text
    # A printable two-character stop string that first occurs past the first few characters.
    start = next(i for i in range(3, len(text) - 1)
                 if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=[text[start:start + 2]])
    expected = plain.generate([context], params)[0]
    accepted = spec.stats()["spec_accepted_tokens"]
    got = spec.generate([context], params)[0]
    assert expected.finish_reason == "stop" and expected.text == text[:start]
    assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids, "stop")
    assert got.usage.completion_tokens == expected.usage.completion_tokens < 16
    assert spec.stats()["spec_accepted_tokens"] > accepted
    deltas = list(spec.stream(context, params))
    assert "".join(d.text for d in deltas) == expected.text
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert spec.stats()["free_blocks"] == spec.stats()["total_blocks"]
