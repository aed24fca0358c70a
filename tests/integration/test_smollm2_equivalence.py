"""The real SmolLM2-135M-Instruct (converted from the packaged GGUF): our model against transformers (fp32, CPU).

Logits at every position of a prompt, and greedy 32-token generations for varied prompts (chat-templated and raw),
all ours decoded together in one paged-KV batch, each transformers one alone.
"""
from __future__ import annotations

import json

import pytest
import torch

from optimum_nvidia_core.hub import DEFAULT_MODEL, resolve_model
from optimum_nvidia_core.models.loader import load_model

MAX_NEW_TOKENS = 32
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences what a hash table is.",
    "List three fruits that are red.",
    "Write a Python function that reverses a string.",
]
RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the mountains,",
    "1, 2, 3, 4, 5,",
    "Q: Why is the sky blue?\nA:",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, two threads that wait on each other run ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def our_model(smollm2_dir):
    return load_model(smollm2_dir, torch.float32, "cpu")


def encode_prompts(tokenizer) -> list[list[int]]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in CHAT_PROMPTS]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in chats + RAW_PROMPTS]


def test_default_model_resolves_offline_with_tokenizer_and_template(smollm2_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(DEFAULT_MODEL) == smollm2_dir
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert any(p.suffix == ".safetensors" for p in smollm2_dir.iterdir())
    assert json.loads((smollm2_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not any(p.name.startswith(".") and ".tmp-" in p.name for p in smollm2_dir.parent.iterdir())


def test_logits_match_transformers(tokenizer, hf_model, our_model, paged_runner):
    prompts = encode_prompts(tokenizer)[:2] + encode_prompts(tokenizer)[-2:]
    runner = paged_runner(our_model, num_blocks=64, block_size=16)
    logits = runner.step([(i, p) for i, p in enumerate(prompts)])  # one flat batch of four prompts
    start = 0
    for prompt in prompts:
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0].float()
        ours = logits[start:start + len(prompt)]
        start += len(prompt)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
        assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_greedy_generation_identical_to_transformers(tokenizer, hf_model, our_model, paged_runner):
    prompts = encode_prompts(tokenizer)
    eos = tokenizer.eos_token_id
    ours = paged_runner(our_model, num_blocks=128, block_size=16).greedy(prompts, MAX_NEW_TOKENS, eos_token_id=eos)
    total_compared = 0
    for prompt, generated in zip(prompts, ours):
        with torch.no_grad():
            output = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                       pad_token_id=eos)
        expected = output[0, len(prompt):].tolist()
        if eos in expected:  # transformers pads after EOS; ours stops there
            expected = expected[: expected.index(eos) + 1]
        assert generated == expected, (tokenizer.decode(prompt), tokenizer.decode(generated),
                                       tokenizer.decode(expected))
        total_compared += len(expected)
    assert len(prompts) >= 10 and total_compared >= 10 * 16  # the comparison covers real generations
