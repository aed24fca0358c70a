"""A request lives as long as someone reads it: breaking out of a stream, dropping it unclosed, a reader thread
that returns without closing, an exception while ``generate`` waits, and breaking out of LlamaIndex's formatted
completion streams all abort the request and free its KV blocks (the engine core holds no reference that would
keep it running)."""
from __future__ import annotations

import _thread
import asyncio
import gc
import threading

import pytest

from engine_idle import wait_idle
from optimum_nvidia_core import LLM, SamplingParams

MAX_TOKENS = 400
LONG = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
PROMPT = [5, 40, 77, 100]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=512)
    yield llm
    llm.shutdown()


def assert_aborted(llm: LLM, before: dict) -> None:
    """Idle with every block free, and far fewer tokens computed than the request would have made."""
    stats = wait_idle(llm, timeout=20)
    assert stats["running_requests"] == 0
    assert stats["free_blocks"] == stats["total_blocks"], "KV blocks leaked"
    computed = stats["tokens_computed"] - before["tokens_computed"]
    assert computed < MAX_TOKENS / 2, f"the request kept generating ({computed} tokens)"


def test_breaking_out_of_a_stream_aborts(llm):
    before = llm.stats()
    for i, _ in enumerate(llm.stream(PROMPT, LONG)):
        if i == 2:
            break
    gc.collect()
    assert_aborted(llm, before)


def test_dropping_an_unclosed_stream_aborts(llm):
    before = llm.stats()
    stream = llm.stream(PROMPT, LONG)
    next(stream)
    del stream
    assert_aborted(llm, before)


def test_a_reader_thread_that_returns_without_closing_aborts(llm):
    before = llm.stats()

    def reader():
        stream = llm.stream(PROMPT, LONG)
        next(stream)  # returns with the stream unread and unclosed

    thread = threading.Thread(target=reader)
    thread.start()
    thread.join()
    assert_aborted(llm, before)


def test_an_exception_while_generate_waits_aborts_every_prompt(llm):
    before = llm.stats()
    first = llm.stream(PROMPT, SamplingParams(max_tokens=2, temperature=0.0))
    list(first)  # the engine is warm
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        llm.generate([PROMPT, [6, 7, 8], [9, 10, 11]], LONG)
    timer.join()
    stats = wait_idle(llm, timeout=20)
    assert stats["running_requests"] == 0 and stats["free_blocks"] == stats["total_blocks"]
    assert stats["tokens_computed"] - before["tokens_computed"] < 3 * MAX_TOKENS / 2


def test_async_stream_dropped_after_a_break_aborts(llm):
    before = llm.stats()

    async def first_delta_only():
        async for _ in llm.astream(PROMPT, LONG):
            break

    asyncio.run(first_delta_only())
    gc.collect()
    assert_aborted(llm, before)


def test_llamaindex_formatted_completion_streams_abort_on_break(tiny_llama_dir):
    from llamaindex_optimum_nvidia import OptimumNvidiaLLM

    li = OptimumNvidiaLLM(model=str(tiny_llama_dir), device="cpu", max_seq_len=512, temperature=0.0,
                          max_tokens=MAX_TOKENS, model_kwargs={"block_size": 4})
    core = li.get_llm()
    before = core.stats()
    for i, _ in enumerate(li.stream_complete("Long story:", formatted=True, ignore_eos=True)):
        if i == 2:
            break
    gc.collect()
    assert_aborted(core, before)

    async def first_delta_only():
        async for _ in await li.astream_complete("Long story:", formatted=True, ignore_eos=True):
            break

    before = core.stats()
    asyncio.run(first_delta_only())
    gc.collect()
    assert_aborted(core, before)
