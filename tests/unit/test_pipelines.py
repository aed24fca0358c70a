"""The drop-in API (pipeline, AutoModelForCausalLM) on a tiny random LLaMA: same outputs and return structures as
transformers on the same checkpoint, and transformers' option rules."""
from __future__ import annotations

import pytest
import torch
import transformers

from optimum_nvidia_core import AutoModelForCausalLM
from optimum_nvidia_core.modeling import pad_sequences, to_sampling_params, unpadded_rows
from optimum_nvidia_core.pipelines import pipeline

CHAT = [{"role": "user", "content": "The quick brown fox"}]
PREFILL_CHAT = [{"role": "user", "content": "Paris is"}, {"role": "assistant", "content": "the capital"}]


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    causal_lm = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), device="cpu", max_batch_size=8,
                                                     max_prompt_length=64, max_new_tokens=32)
    yield causal_lm
    causal_lm.llm.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """transformers' own model and pipeline on the same directory (the expected outputs)."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    return hf_model, tokenizer, transformers.pipeline("text-generation", model=hf_model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def pipe(model):
    return pipeline("text-generation", model)


# ---- pipeline: same answers and structures as transformers -------------------------------------------------------

@pytest.mark.parametrize("inputs, options", [
    ("The quick brown fox", {}),
    (["The quick brown fox", "Paris is the capital of"], {}),
    (["Once upon a time", "def add(a, b):"], {"return_full_text": False}),
    (CHAT, {}),
    ([CHAT, PREFILL_CHAT], {}),
    (PREFILL_CHAT, {"return_full_text": False}),
    ("Berlin is", {"return_tensors": True}),
    ("The lazy dog", {"prefix": "Once upon a time. "}),
    ("The lazy dog", {"repetition_penalty": 1.5, "max_new_tokens": 12}),
    ("The lazy dog", {"max_length": 9}),
])
def test_pipeline_matches_transformers_greedy(pipe, reference, inputs, options):
    options = {"do_sample": False, "max_new_tokens": 8, **options}
    if "max_length" in options:
        del options["max_new_tokens"]
    assert pipe(inputs, **options) == reference[2](inputs, **options)


def test_pipeline_call_options_set_at_construction_are_defaults(model, reference):
    pipe = pipeline("text-generation", model, do_sample=False, max_new_tokens=5)
    assert pipe("Paris is") == reference[2]("Paris is", do_sample=False, max_new_tokens=5)
    assert len(pipe("Paris is", return_tensors=True)[0]["generated_token_ids"]) <= len(
        reference[1]("Paris is")["input_ids"]) + 5


def test_pipeline_samples_by_default_and_returns_n_sequences(pipe):
    out = pipe(["Paris is", "Berlin is"], num_return_sequences=3, max_new_tokens=6, seed=7, return_full_text=False)
    assert [len(per_prompt) for per_prompt in out] == [3, 3]
    assert all(set(record) == {"generated_text"} for per_prompt in out for record in per_prompt)
    again = pipe(["Paris is", "Berlin is"], num_return_sequences=3, max_new_tokens=6, seed=7, return_full_text=False)
    assert again == out  # same seed, same samples


@pytest.mark.parametrize("options, error", [
    ({"num_return_sequences": 2, "do_sample": False}, ValueError),
    ({"return_full_text": False, "return_tensors": True}, ValueError),
    ({"num_beams": 4}, ValueError),
    ({"no_such_option": 1}, TypeError),
    ({"handle_long_generation": "tail"}, ValueError),
])
def test_pipeline_rejects_bad_options_with_clear_errors(pipe, options, error):
    with pytest.raises(error):
        pipe("Paris is", max_new_tokens=4, **options)


def test_pipeline_rejects_other_tasks_and_inputs(model, pipe):
    with pytest.raises(ValueError, match="text-generation"):
        pipeline("summarization", model)
    with pytest.raises(TypeError, match="string"):
        pipe(42)
    with pytest.raises(ValueError, match="already loaded"):
        pipeline("text-generation", model, max_batch_size=4)


def test_pipeline_long_prompt_hole_keeps_the_tail(pipe, model):
    prompt = "The quick brown fox jumps over the lazy dog. " * 60  # longer than the 96-token context
    out = pipe(prompt, do_sample=False, max_new_tokens=8, return_tensors=True, handle_long_generation="hole")
    assert len(out[0]["generated_token_ids"]) <= model.llm.max_seq_len


# ---- AutoModelForCausalLM.generate: the seed's (ids, lengths) ----------------------------------------------------

def test_generate_left_padded_batch_matches_transformers(model, reference):
    hf_model, tokenizer, _ = reference
    tokenizer.padding_side = "left"
    prompts = ["The quick brown fox jumps over", "Paris", "def add(a, b): return"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, lengths = model.generate(**inputs, max_new_tokens=10, repetition_penalty=1.3)
    expected = hf_model.generate(**inputs, max_new_tokens=10, repetition_penalty=1.3, do_sample=False)
    assert ids.shape[:2] == (3, 1) and lengths.shape == (3, 1) and ids.dtype == torch.long
    for i in range(3):
        keep = inputs["attention_mask"][i].bool()
        prompt = inputs["input_ids"][i][keep].tolist()
        theirs = expected[i, inputs["input_ids"].shape[1]:].tolist()
        ours = ids[i, 0, : lengths[i, 0]].tolist()
        assert ours[: len(prompt)] == prompt
        assert ours[len(prompt):] == theirs[: len(ours) - len(prompt)]
        assert ids[i, 0, lengths[i, 0]:].eq(tokenizer.pad_token_id).all()
    decoded = tokenizer.batch_decode(ids[0], skip_special_tokens=True)
    assert decoded == tokenizer.batch_decode(expected[:1], skip_special_tokens=True)


def test_generate_follows_generation_config_defaults(tiny_llama_dir, reference):
    hf_model, tokenizer, _ = reference
    bare = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), device="cpu", max_batch_size=8)
    inputs = tokenizer(["Paris is the"], return_tensors="pt")
    try:
        ids, lengths = bare.generate(**inputs)  # transformers' defaults: greedy, 20 new tokens
        expected = hf_model.generate(**inputs, max_new_tokens=20)[0].tolist()
        assert ids[0, 0, : lengths[0, 0]].tolist() == expected[: int(lengths[0, 0])]
        assert int(lengths[0, 0]) == min(len(expected), inputs["input_ids"].shape[1] + 20)
        ids, lengths = bare.generate(**inputs, max_length=6)  # max_length counts the prompt
        assert ids[0, 0, : lengths[0, 0]].tolist() == expected[:6][: int(lengths[0, 0])]
    finally:
        bare.llm.shutdown()


def test_generate_one_dimensional_and_sampled_rows(model):
    ids, lengths = model.generate(torch.tensor([5, 6, 7, 8]), max_new_tokens=4, do_sample=True,
                                  num_return_sequences=2, seed=3, top_k=20, temperature=0.9)
    assert ids.shape[:2] == (1, 2) and lengths.shape == (1, 2)
    assert ids[0, :, :4].tolist() == [[5, 6, 7, 8]] * 2


def test_generate_errors_name_the_fix(model):
    with pytest.raises(ValueError, match="max_prompt_length"):
        model.generate(torch.ones(1, 65, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(TypeError, match="unsupported"):
        model.generate(torch.ones(1, 3, dtype=torch.long), output_scores=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_save_pretrained_round_trip(model, tmp_path):
    inputs = torch.tensor([[11, 12, 13, 14]])
    before, _ = model.generate(inputs, max_new_tokens=6)
    engine_dir = model.save_pretrained(tmp_path / "engine")
    reloaded = AutoModelForCausalLM.from_pretrained(str(engine_dir), device="cpu", max_batch_size=4)
    try:
        after, _ = reloaded.generate(inputs, max_new_tokens=6)
        assert torch.equal(before, after)
    finally:
        reloaded.llm.shutdown()


# ---- pure helpers ------------------------------------------------------------------------------------------------

def test_to_sampling_params_follows_transformers_rules():
    greedy = to_sampling_params({"top_k": 40, "top_p": 0.7, "repetition_penalty": 10}, prompt_len=5)
    assert (greedy.temperature, greedy.top_k, greedy.top_p, greedy.repetition_penalty) == (0.0, 0, 1.0, 10.0)
    assert greedy.max_tokens == 20  # transformers 5: 20 new tokens when no length is set
    assert to_sampling_params({"max_length": 12}, prompt_len=5).max_tokens == 7  # max_length counts the prompt
    sampled = to_sampling_params({"do_sample": True, "max_new_tokens": 7, "min_length": 8}, prompt_len=5)
    assert (sampled.temperature, sampled.top_k, sampled.max_tokens, sampled.min_tokens) == (1.0, 50, 7, 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        to_sampling_params({"max_length": 20}, prompt_len=20)


def test_unpadded_rows_and_padding_helpers():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert unpadded_rows(ids, mask) == [[5, 6], [7, 8, 9]]
    padded, lengths = pad_sequences([[[1, 2, 3]], [[4]]], pad_token_id=9)
    assert padded.tolist() == [[[1, 2, 3]], [[4, 9, 9]]] and lengths.tolist() == [[3], [1]]
