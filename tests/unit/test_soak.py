"""Soak: 1,000 concurrent streams (asyncio tasks and threads) of random lengths and sampling settings on a tiny
random LLaMA (CPU), 10% of them aborted midway. Nothing is lost, greedy and seeded streams equal their sequential
runs, no KV block leaks, and a second round leaves memory where the first one left it."""
from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from optimum_nvidia_core import LLM, SamplingParams
from engine_idle import wait_idle

NUM_STREAMS = 1000
NUM_THREAD_STREAMS = 200  # of NUM_STREAMS, read as sync iterators on worker threads; the rest are astreams
ABORT_FRACTION = 0.10
MEMORY_ROUND_STREAMS = 300  # per leak-check round (tracemalloc slows everything ~3x)
ROUND_TIMEOUT_S = 120  # a hung stream fails the test instead of hanging CI


@dataclass
class Job:
    """One stream of the soak: what to send, how to read it, and what came back."""

    index: int
    prompt: list[int]
    params: SamplingParams
    abort_after: int | None  # close the stream after this many deltas; None reads it to the end
    expected: list[int] | None = None  # token ids of the same request run alone (greedy or seeded jobs)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    deltas: int = 0


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    # A cache smaller than the running batch wants: preemption, recompute and prefix reuse all happen.
    llm = LLM(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=128, max_batch_size=128,
              max_num_tokens=512, num_kv_blocks=700)
    yield llm
    llm.shutdown()


def _prompt_pool(vocab_size: int, rng: random.Random) -> list[list[int]]:
    """40 prompts of 1..60 tokens; the first 10 share a 24-token prefix so the prefix cache is exercised."""
    shared = [rng.randrange(3, vocab_size) for _ in range(24)]
    pool = [shared + [rng.randrange(3, vocab_size) for _ in range(rng.randint(1, 20))] for _ in range(10)]
    pool += [[rng.randrange(3, vocab_size) for _ in range(rng.randint(1, 60))] for _ in range(30)]
    return pool


def _random_sampled_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        max_tokens=rng.randint(1, 40), temperature=rng.choice([0.5, 0.8, 1.0, 1.5]), top_p=rng.choice([1.0, 0.9, 0.5]),
        top_k=rng.choice([0, 5, 50]), min_p=rng.choice([0.0, 0.05]), repetition_penalty=rng.choice([1.0, 1.2]),
        presence_penalty=rng.choice([0.0, 0.5]), frequency_penalty=rng.choice([0.0, 0.3]),
        n=rng.choice([1, 1, 1, 2]), logprobs=rng.choice([None, None, 2]), ignore_eos=True,
        stop=rng.choice([[], [], ["e"], ["the", "x"]]),
    )


def _make_jobs(llm: LLM, seed: int) -> list[Job]:
    """Greedy jobs (30%) and seeded jobs (20%) draw from a few fixed requests whose sequential output is known;
    the rest sample freely. Every 10th job is aborted after 1-3 deltas."""
    rng = random.Random(seed)
    pool = _prompt_pool(llm.vocab_size, rng)
    greedy = [(rng.choice(pool), SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.0, ignore_eos=True))
              for _ in range(12)]
    seeded = [(rng.choice(pool), SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.9, top_p=0.9,
                                                top_k=40, seed=rng.randrange(2**31), ignore_eos=True))
              for _ in range(8)]
    known = greedy + seeded
    expected = [llm.generate([prompt], params)[0].token_ids for prompt, params in known]  # one at a time
    jobs = []
    for i in range(NUM_STREAMS):
        abort_after = rng.randint(1, 3) if i % round(1 / ABORT_FRACTION) == 0 else None
        kind = rng.random()
        if kind < 0.5:
            k = rng.randrange(len(greedy)) if kind < 0.3 else len(greedy) + rng.randrange(len(seeded))
            jobs.append(Job(i, known[k][0], known[k][1], abort_after, expected=expected[k]))
        else:
            jobs.append(Job(i, rng.choice(pool), _random_sampled_params(rng), abort_after))
    rng.shuffle(jobs)
    return jobs


def _record(job: Job, delta) -> None:
    job.deltas += 1
    if delta.index == 0:
        job.token_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            job.finish_reason = delta.finish_reason


async def _read_async(llm: LLM, job: Job) -> None:
    stream = llm.astream(job.prompt, job.params)
    async for delta in stream:
        _record(job, delta)
        if job.abort_after is not None and job.deltas >= job.abort_after:
            await stream.aclose()
            return
        await asyncio.sleep(0)


def _read_sync(llm: LLM, job: Job) -> None:
    stream = llm.stream(job.prompt, job.params)
    for delta in stream:
        _record(job, delta)
        if job.abort_after is not None and job.deltas >= job.abort_after:
            stream.close()
            return


async def _run_round(llm: LLM, jobs: list[Job]) -> None:
    """All jobs at once: NUM_THREAD_STREAMS on a thread pool (sync iterators), the others as asyncio tasks."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=32) as pool:
        thread_jobs = [loop.run_in_executor(pool, _read_sync, llm, job) for job in jobs[:NUM_THREAD_STREAMS]]
        async_jobs = [_read_async(llm, job) for job in jobs[NUM_THREAD_STREAMS:]]
        await asyncio.wait_for(asyncio.gather(*thread_jobs, *async_jobs), ROUND_TIMEOUT_S)


def _check_round(llm: LLM, jobs: list[Job]) -> None:
    for job in jobs:
        if job.abort_after is not None:
            continue
        assert job.finish_reason in ("length", "stop"), f"job {job.index} lost: {job}"
        if job.expected is not None:
            assert job.token_ids == job.expected, f"job {job.index} differs from its sequential run"
        elif job.finish_reason == "length":
            assert len(job.token_ids) == job.params.max_tokens
    stats = wait_idle(llm, timeout=10.0)
    assert stats["running_requests"] == 0
    assert stats["free_blocks"] == stats["total_blocks"], "KV blocks leaked"
    assert stats["errors"] == 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_soak_1000_streams_nothing_lost_no_leaks(llm):
    jobs = _make_jobs(llm, seed=1)
    assert sum(j.abort_after is not None for j in jobs) == NUM_STREAMS * ABORT_FRACTION
    asyncio.run(_run_round(llm, jobs))
    _check_round(llm, jobs)
    stats = llm.stats()
    assert stats["max_running_seqs"] >= 64  # the streams really shared steps
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0

    # Memory: two more (smaller) rounds under tracemalloc. The first fills whatever caches a round fills; the
    # second must then leave no more held than the first did (a leaked request holds kilobytes).
    rss_before = _rss_bytes()
    tracemalloc.start()
    try:
        snapshots = []
        for seed in (2, 3):
            jobs = _make_jobs(llm, seed)[:MEMORY_ROUND_STREAMS]
            asyncio.run(_run_round(llm, jobs))
            _check_round(llm, jobs)
            del jobs
            gc.collect()
            snapshots.append(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
    diff = snapshots[1].compare_to(snapshots[0], "lineno")
    growth = sum(stat.size_diff for stat in diff)
    assert growth < 256 << 10, f"the last round left {growth} more bytes held; biggest: {diff[:5]}"
    rss_growth = _rss_bytes() - rss_before
    assert rss_growth < 64 << 20, f"RSS grew by {rss_growth >> 20} MiB over two more rounds"


TEXT_STREAMS = 300
TEXT_WORDS = ["Paris", "capital", "weather", "numbers", "cities", "code", "answer", "the", "of", "is", "model"]


def _read_text_job(llm: LLM, rng: random.Random, index: int) -> str | None:
    """One text prompt or chat turn, read to the end or left by a ``break`` without closing (every tenth)."""
    words = " ".join(rng.choice(TEXT_WORDS) for _ in range(rng.randint(1, 30)))
    params = SamplingParams(max_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 0.8]), stop=["zz"])
    if index % 2:
        deltas = llm.chat_stream([{"role": "user", "content": words}], params)
    else:
        deltas = llm.stream(words, params)
    finish = None
    for count, delta in enumerate(deltas):
        if index % 10 == 0 and count == 1:
            break  # abandoned: no close(), the stream is just dropped
        finish = delta.finish_reason or finish
    return finish


def test_soak_text_and_chat_from_many_threads_with_abandoned_streams(llm):
    rngs = [random.Random(1000 + i) for i in range(TEXT_STREAMS)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        finishes = list(pool.map(lambda i: _read_text_job(llm, rngs[i], i), range(TEXT_STREAMS)))
    gc.collect()
    read_to_the_end = [f for i, f in enumerate(finishes) if i % 10]
    assert all(f in ("stop", "length") for f in read_to_the_end), "a stream read to the end lost its finish"
    stats = wait_idle(llm, timeout=20.0)
    assert stats["running_requests"] == 0
    assert stats["free_blocks"] == stats["total_blocks"], "KV blocks leaked"
