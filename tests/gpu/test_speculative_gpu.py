"""Prompt-lookup speculative decoding on the GPU: greedy output equals plain greedy decoding, token for token.

The tiny model is a copy of the random one with its attention output scaled down (its greedy output falls into
cycles that prompt lookup predicts, so proposals are accepted) and its final norm scaled up (peaked logits: a
verify step computes its rows with other kernels and GEMM shapes than a decode step, and bf16 rounding must not
flip a near-tie of a flat random distribution).
"""
from __future__ import annotations

import random
import shutil

import pytest
import torch


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def _peaked_looping_copy(src, dst):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for name in weights:
        if "o_proj" in name:
            weights[name] = weights[name] * 0.2
        elif name == "model.norm.weight":
            weights[name] = weights[name] * 8.0
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("enforce_eager", [False, True])  # verify steps replay mixed-batch graphs, or run eagerly
def test_speculative_greedy_equals_plain_greedy_on_cuda(cuda, tiny_llama_dir, tmp_path, enforce_eager):
    from optimum_nvidia_core import LLM, SamplingParams

    model_dir = _peaked_looping_copy(tiny_llama_dir, tmp_path / "model")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 40))] for _ in range(5)]
    prompts.append([5, 6, 7, 8, 9] * 6)
    options = dict(device="cuda", dtype="bfloat16", max_batch_size=16, block_size=16, enforce_eager=enforce_eager)
    plain = LLM(str(model_dir), **options)
    spec = LLM(str(model_dir), speculative="ngram", **options)
    try:
        params = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
        expected = [o.token_ids for o in plain.generate(prompts, params)]
        assert [o.token_ids for o in spec.generate(prompts, params)] == expected  # one batch of 6
        for prompt, tokens in zip(prompts[:3], expected):  # bs1, where speculation matters most
            assert spec.generate([prompt], params)[0].token_ids == tokens
        stats = spec.stats()
        generated = 96 * (len(prompts) + 3)
        assert stats["spec_accepted_tokens"] > 0.05 * generated  # about 12% on the CPU in fp32
        assert stats["free_blocks"] == stats["total_blocks"]
        # Sampled: the same seeded draws, but from probabilities other kernels computed: only the lengths are
        # certain to match (the equality of seeded draws is tested on the CPU, tests/unit/test_speculative.py).
        sampled = SamplingParams(max_tokens=40, temperature=0.8, seed=5, n=2, ignore_eos=True)
        assert [len(c.token_ids) for c in spec.generate([prompts[-1]], sampled)[0].choices] == [40, 40]
        assert spec.stats()["free_blocks"] == spec.stats()["total_blocks"]
    finally:
        plain.shutdown()
        spec.shutdown()
