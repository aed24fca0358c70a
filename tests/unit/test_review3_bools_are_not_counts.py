"""Review 3: True/False given where a count or a token id is expected is an error that says so; pydantic's lax
mode read them as 1/0 (SamplingParams(logprobs=True) returned one top log-probability, max_tokens=True one
token, a prompt [True, False] became the token ids [1, 0])."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from optimum_nvidia_core.engine.interface import EngineInfo
from optimum_nvidia_core.input_processor import InputProcessor
from optimum_nvidia_core.sampling_params import SamplingParams


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("n", True), ("seed", False), ("top_k", True),
                                          ("stop_token_ids", [True]), ("min_tokens", True)])
def test_bools_are_refused_for_counts(field, value):
    with pytest.raises(ValidationError, match=f"{field}\n.*integers, not True/False"):
        SamplingParams(**{field: value})


def test_logprobs_true_says_what_logprobs_means():
    with pytest.raises(ValidationError, match="how many top log-probabilities"):
        SamplingParams(logprobs=True)
    assert SamplingParams(logprobs=0, max_tokens=3, seed=0, n=2).logprobs == 0  # integers still pass


def test_a_prompt_of_bools_is_not_token_ids():
    info = EngineInfo(model_dir="m", model_name="m", max_seq_len=64, vocab_size=512, eos_token_ids=[2],
                      device="cpu", num_blocks=16, block_size=4)
    with pytest.raises(ValueError, match=r"prompt token ids must be ints .*True"):
        InputProcessor(tokenizer=None, info=info).check_prompt([True, False, 5], SamplingParams(max_tokens=4))
