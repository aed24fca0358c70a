"""Runtime behaviour through the public LLM facade on a tiny random LLaMA (CPU): in-flight batching, paged KV
cache, preemption, prefix reuse, streaming, cancellation, stop strings, seeds."""
from __future__ import annotations

import asyncio

import pytest

from optimum_nvidia_core import LLM, SamplingParams
from engine_idle import wait_idle

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture
def make_llm(tiny_llama_dir):
    made = []

    def make(**options):
        options.setdefault("device", "cpu")
        options.setdefault("block_size", 4)
        options.setdefault("max_seq_len", 512)
        llm = LLM(str(tiny_llama_dir), **options)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.shutdown()


def _prompts(llm, count):
    vocab = llm.vocab_size
    return [[(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(3 + 5 * i)] for i in range(count)]


def test_batch_invariance_greedy(make_llm):
    llm = make_llm(max_batch_size=16)
    prompts = _prompts(llm, 16)
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    together = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert together == alone
    assert llm.stats()["max_running_seqs"] >= 8  # they really shared steps
    assert all(len(t) == 12 for t in alone)


def test_preemption_keeps_outputs(make_llm):
    roomy = make_llm(max_batch_size=8)
    prompts = _prompts(roomy, 8)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    # 40 blocks of 4 tokens: every sequence fits alone (<= 60 tokens), all eight at once do not.
    tight = make_llm(max_batch_size=8, num_kv_blocks=40, max_seq_len=128)
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert got == expected
    assert tight.stats()["preemptions"] > 0
    stats = wait_idle(tight)
    assert stats["free_blocks"] == stats["total_blocks"]


def test_prefix_reuse_computes_only_new_tokens(make_llm):
    llm = make_llm(max_batch_size=4)
    prefix = _prompts(llm, 41)[40][:200]
    assert len(prefix) == 200
    llm.generate([prefix + [11, 12, 13]], SamplingParams(max_tokens=1, temperature=0))
    before = llm.stats()["prompt_tokens_computed"]
    out = llm.generate([prefix + [21, 22, 23, 24, 25]], SamplingParams(max_tokens=1, temperature=0))[0]
    computed = llm.stats()["prompt_tokens_computed"] - before
    assert computed <= 205 - 200 + 4  # at most the new tokens plus the partial last block of the prefix
    assert out.usage.cached_tokens >= 196


async def test_200_concurrent_astreams_match_sequential(make_llm):
    llm = make_llm(max_batch_size=64, max_seq_len=128)
    prompts = _prompts(llm, 20)
    params = [SamplingParams(max_tokens=3 + i % 7, temperature=0.0, ignore_eos=True) for i in range(200)]
    expected = {i: llm.generate([prompts[i % 20]], params[i])[0].token_ids for i in range(20)}

    async def one(i):
        ids = []
        async for delta in llm.astream(prompts[i % 20], params[i]):
            ids.extend(delta.token_ids)
        return ids

    results = await asyncio.gather(*(one(i) for i in range(200)))
    for i, ids in enumerate(results):
        if i < 20:
            assert ids == expected[i]
        else:
            assert len(ids) == params[i].max_tokens
    assert llm.stats()["max_running_seqs"] > 20
    stats = wait_idle(llm)
    assert stats["free_blocks"] == stats["total_blocks"]


def test_breaking_a_stream_aborts_and_frees_blocks(make_llm):
    llm = make_llm()
    stream = llm.stream(_prompts(llm, 3)[2], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 2:
            break
    del stream
    stats = wait_idle(llm)
    assert stats["running_requests"] == 0
    assert stats["free_blocks"] == stats["total_blocks"]


async def test_cancelling_an_astream_task_frees_blocks(make_llm):
    llm = make_llm()

    async def consume():
        async for _ in llm.astream(_prompts(llm, 3)[2], SamplingParams(max_tokens=400, ignore_eos=True)):
            await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await asyncio.to_thread(wait_idle, llm)
    assert stats["running_requests"] == 0
    assert stats["free_blocks"] == stats["total_blocks"]


def test_stop_string_across_tokens_is_not_emitted(make_llm):
    llm = make_llm()
    prompt = _prompts(llm, 5)[4]
    full = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    text = full.text
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [llm.tokenizer.decode(full.token_ids[: k + 1]) for k in range(len(full.token_ids))]
    k = next(k for k in range(3, len(pieces)) if len(pieces[k]) - len(pieces[k - 2]) >= 4)
    stop = text[len(pieces[k - 2]) - 2: len(pieces[k - 2]) + 2]
    if not stop.strip():
        pytest.skip("random model produced only whitespace around the boundary")
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert stop not in out.text
    assert text.startswith(out.text)
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop"


def test_seed_gives_same_output_in_any_batch(make_llm):
    llm = make_llm(max_batch_size=8)
    prompts = _prompts(llm, 6)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[3]], seeded)[0].token_ids
    others = [SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True)] * 5
    batch = llm.generate(prompts[:3] + [prompts[3]] + prompts[4:], others[:3] + [seeded] + others[3:])
    assert batch[3].token_ids == alone
    different = llm.generate([prompts[3]], seeded.model_copy(update={"seed": 4321}))[0].token_ids
    assert different != alone


def test_n_completions_and_usage(make_llm):
    llm = make_llm()
    out = llm.generate([_prompts(llm, 2)[1]], SamplingParams(n=3, max_tokens=5, seed=7, ignore_eos=True))[0]
    assert len(out.choices) == 3
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 15
    assert out.usage.prompt_tokens == 8
    assert out.metrics.time_to_first_token is not None


def test_bad_requests_fail_alone(make_llm):
    llm = make_llm(max_seq_len=64)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([""], GREEDY)
    with pytest.raises(ValueError, match="max_seq_len is 64"):
        llm.generate([[5] * 80], GREEDY)
    out = llm.generate([[5] * 80], SamplingParams(max_tokens=4, truncate_prompt_tokens=50))[0]
    assert out.usage.prompt_tokens == 50
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[5] * 10], SamplingParams(max_tokens=60))
    assert len(llm.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 12  # still serving
