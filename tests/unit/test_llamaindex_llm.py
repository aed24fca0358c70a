"""OptimumNvidiaLLM on a tiny random LLaMA (CPU): sync/async, streamed/whole, one in-flight batch, callbacks."""
from __future__ import annotations

import asyncio

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler

from llamaindex_optimum_nvidia import OptimumNvidiaLLM
from optimum_nvidia_core import SamplingParams

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    llm = OptimumNvidiaLLM(model=str(tiny_llama_dir), device="cpu", max_seq_len=512, max_batch_size=8,
                           temperature=0.0, max_tokens=MAX_TOKENS, model_kwargs={"block_size": 4})
    yield llm
    llm.get_llm().shutdown()


def _greedy(**extra):
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **extra)


def test_metadata_comes_from_the_engine(llm):
    meta = llm.metadata
    assert meta.context_window == 512 == llm.get_llm().max_seq_len
    assert meta.num_output == MAX_TOKENS
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name


def test_complete_goes_through_the_chat_template_and_streams_the_same_text(llm):
    core = llm.get_llm()
    expected = core.chat([{"role": "user", "content": "Paris is"}], _greedy()).text
    whole = llm.complete("Paris is", ignore_eos=True)
    streamed = list(llm.stream_complete("Paris is", ignore_eos=True))
    assert whole.text == expected
    assert "".join(r.delta for r in streamed) == expected == streamed[-1].text
    assert whole.additional_kwargs["completion_tokens"] == MAX_TOKENS
    raw = llm.complete("Paris is", formatted=True, ignore_eos=True)  # formatted: no template, plain continuation
    assert raw.text == core.generate("Paris is", _greedy())[0].text


def test_chat_forms_agree(llm):
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
                ChatMessage(role=MessageRole.USER, content="The capital of France?")]
    expected = llm.get_llm().chat([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "The capital of France?"}], _greedy()).text
    assert llm.chat(messages, ignore_eos=True).message.content == expected
    assert list(llm.stream_chat(messages, ignore_eos=True))[-1].message.content == expected

    async def both_async():
        whole = await llm.achat(messages, ignore_eos=True)
        deltas = [r.delta async for r in await llm.astream_chat(messages, ignore_eos=True)]
        return whole.message.content, "".join(deltas)

    assert asyncio.run(both_async()) == (expected, expected)


def test_eight_concurrent_acomplete_calls_share_one_batch(llm):
    core = llm.get_llm()
    assert core.stats()["max_running_seqs"] < 8  # earlier tests ran one request at a time

    async def eight():
        calls = [llm.acomplete(f"Tell me about city number {i}", max_tokens=16, ignore_eos=True) for i in range(8)]
        return await asyncio.gather(*calls)

    results = asyncio.run(eight())
    assert all(r.additional_kwargs["completion_tokens"] == 16 for r in results)
    assert core.stats()["max_running_seqs"] == 8


def test_async_streaming_leaves_the_event_loop_free(llm):
    async def stream_with_ticker():
        ticks, seen = 0, []

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        async for response in await llm.astream_complete("Count:", max_tokens=24, ignore_eos=True):
            seen.append(ticks)
        task.cancel()
        return seen

    seen = asyncio.run(stream_with_ticker())
    assert len(seen) >= 2
    assert seen[-1] > seen[0]  # the loop ran other tasks while the engine thread generated


def test_breaking_out_of_an_async_stream_aborts_the_request(llm):
    core = llm.get_llm()

    async def first_delta_only():
        stream = await llm.astream_complete("Long story:", max_tokens=200, ignore_eos=True)
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(first_delta_only())
    for _ in range(200):  # the abort reaches the engine thread within a step or two
        if core.stats()["running_requests"] == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert core.stats()["running_requests"] == 0


def test_callbacks_see_llm_events(llm):
    handler = LlamaDebugHandler()
    llm.callback_manager = CallbackManager([handler])
    try:
        llm.complete("Hi")
        list(llm.stream_chat([ChatMessage(content="Hi")]))
    finally:
        llm.callback_manager = CallbackManager([])
    assert len(handler.get_event_pairs(CBEventType.LLM)) == 2


def test_unknown_call_arguments_fail_before_reaching_the_engine(llm):
    with pytest.raises(ValueError, match="unknown generation argument"):
        llm.complete("Hi", temprature=0.5)


def test_a_misspelt_argument_is_an_error_not_ignored():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['temprature'\]"):
        OptimumNvidiaLLM(temprature=0.0)
