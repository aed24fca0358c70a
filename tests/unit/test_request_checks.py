"""Requests checked against the model before they reach the batch (issue 15, items 4 and 12): stop ids beyond the
vocabulary fail alone, numpy token ids are ids, a request too big for the KV cache is refused up front, and an
unbounded one on a small cache ends with "length" instead of an error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum_nvidia_core import LLM, SamplingParams
from optimum_nvidia_core.request_checks import as_token_ids, prompt_list

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[5 + i, 9, 11 + i] for i in range(3)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=64)
    yield llm
    llm.shutdown()


def _ids(stream) -> list[int]:
    return [t for delta in stream for t in delta.token_ids]


def test_stop_id_beyond_the_vocabulary_fails_alone_amid_running_requests(llm):
    expected = [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]
    running = [llm.stream(p, GREEDY) for p in PROMPTS[:2]]
    for bad in ([100000], [512], [3, 2**31 - 1]):
        with pytest.raises(ValueError, match=r"stop_token_ids must be token ids of this model, in \[0, 512\)"):
            llm.stream([5, 6, 7], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=bad))
    running.append(llm.stream(PROMPTS[2], GREEDY))
    assert [_ids(s) for s in running] == expected  # the same step's other requests are untouched
    in_vocab = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[511]))[0]
    assert len(in_vocab.token_ids) >= 2
    stats = llm.stats()
    assert stats["errors"] == 0 and stats["free_blocks"] == stats["total_blocks"]


@pytest.mark.parametrize("prompt", [np.array([5, 6, 7]), np.array([5, 6, 7], dtype=np.int32),
                                    [np.int64(5), np.int64(6), np.int64(7)], torch.tensor([5, 6, 7]), (5, 6, 7)])
def test_numpy_and_torch_token_ids_are_token_ids(llm, prompt):
    expected = llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
    assert llm.generate(prompt, GREEDY)[0].token_ids == expected  # one prompt, not three
    assert llm.generate([prompt], GREEDY)[0].token_ids == expected
    assert _ids(llm.stream(prompt, GREEDY)) == expected


def test_a_2d_array_is_one_prompt_per_row(llm):
    rows = np.array(PROMPTS)
    assert [o.token_ids for o in llm.generate(rows, GREEDY)] == [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_non_integer_arrays_are_still_refused(llm):
    with pytest.raises(ValueError, match=r"token ids must be ints .*got \[5.5"):
        llm.stream(np.array([5.5, 6.0]), GREEDY)
    assert as_token_ids("text") == "text" and as_token_ids(None) is None
    assert prompt_list([]) == []


def test_unbounded_request_on_a_small_kv_cache_ends_with_length(tiny_llama_dir):
    """max_tokens=None means "up to the context": with 4 blocks of 16 tokens that context is 64 tokens, not the
    512 of max_seq_len, so the request ends there with "length" and all its tokens (it used to fail part-way)."""
    small = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=4, block_size=16, max_seq_len=512)
    try:
        params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
        deltas = list(small.stream([5, 6, 7], params))
        assert deltas[-1].finish_reason == "length"
        assert sum(len(d.token_ids) for d in deltas) == 64 - 3
        fits = small.generate([[5, 6, 7]], SamplingParams(max_tokens=61, temperature=0.0, ignore_eos=True))[0]
        assert fits.finish_reason == "length" and len(fits.token_ids) == 61
        assert small.max_seq_len == 64
    finally:
        small.shutdown()
