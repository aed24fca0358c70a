"""FP8 build on a tiny random LLaMA checkpoint: calibration data, quantization, save/load, perplexity."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.checkpoint import write_random_checkpoint
from optimum_nvidia_core.build import (
    Fp8Recipe, build_fp8_engine, check_fp8_supported, load_engine, perplexity, quantize_model, read_manifest,
)
from optimum_nvidia_core.build.calibration import (
    calibration_hash, default_calibration_samples, select_calibration_samples, tokenize_samples,
)
from optimum_nvidia_core.build.calibration_text import CALIBRATION_TEXTS
from optimum_nvidia_core.build.scratch_prefill import prefill
from optimum_nvidia_core.config import EngineConfig
from optimum_nvidia_core.e4m3 import FP8_DTYPE
from optimum_nvidia_core.layers.fp8_linear import Fp8Linear
from optimum_nvidia_core.layers.linear import Linear
from optimum_nvidia_core.models.loader import load_model


def make_tiny_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer LLaMA (GQA, hidden 64) with random weights and a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CALIBRATION_TEXTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, architectures=["LlamaForCausalLM"],
    )
    return write_random_checkpoint(config, Path(out_dir), dtype=torch.float32, seed=seed, std=0.1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def calib_tokens(tokenizer) -> list[list[int]]:
    return tokenize_samples(tokenizer, default_calibration_samples()[:12], max_length=128)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _logits(model, token_ids: list[int]) -> torch.Tensor:
    return model.compute_logits(prefill(model, [token_ids]))


# ---- calibration data ---------------------------------------------------------------------------------------
def test_default_samples_mix_text_and_conversations():
    samples = default_calibration_samples()
    assert len(samples) >= 30
    assert any(isinstance(s, list) for s in samples[:8]) and any(isinstance(s, str) for s in samples[:8])


def test_custom_data_list_iterator_and_dataset_like():
    texts = ["first text", "", "second text", "third text"]
    assert select_calibration_samples(texts, 2) == ["first text", "second text"]  # empty strings skipped
    generator = (t for t in texts)
    assert select_calibration_samples(generator, 10) == ["first text", "second text", "third text"]

    class Rows:  # the part of the datasets.Dataset interface we use: column_names + iteration over dict rows
        column_names = ["text", "label"]

        def __iter__(self):
            return iter({"text": t, "label": 0} for t in texts)

    assert select_calibration_samples(Rows(), 1) == ["first text"]


@pytest.mark.parametrize("bad, error", [
    ("one long string", "single string"), ([], "no non-empty text"), ([1, 2], "not a string"), (42, "iterable"),
])
def test_bad_calibration_data_has_clear_errors(bad, error):
    with pytest.raises((TypeError, ValueError), match=error):
        select_calibration_samples(bad, 4)


def test_dataset_without_text_column_names_the_columns():
    class Rows:
        column_names = ["content"]

        def __iter__(self):
            return iter([])

    with pytest.raises(ValueError, match="content.*rename_column"):
        select_calibration_samples(Rows(), 4)


def test_calibration_hash_depends_on_data_and_length():
    assert calibration_hash(["a"], 8) == calibration_hash(["a"], 8)
    assert calibration_hash(["a"], 8) != calibration_hash(["b"], 8)
    assert calibration_hash(["a"], 8) != calibration_hash(["a"], 16)


def test_tokenize_truncates_and_renders_conversations(tokenizer):
    conversation = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    token_lists = tokenize_samples(tokenizer, [CALIBRATION_TEXTS[0], conversation], max_length=64)
    assert len(token_lists[0]) == 64  # truncated
    # This tokenizer has no chat template: the conversation becomes a plain transcript.
    assert token_lists[1] == tokenizer("User: hello there\nAssistant: hi")["input_ids"]


# ---- quantization -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["static", "dynamic"])
def test_quantize_swaps_decoder_linears_and_stays_close(tiny_dir, tokenizer, calib_tokens, activation):
    reference = load_model(tiny_dir, torch.float32, "cpu")
    model = load_model(tiny_dir, torch.float32, "cpu")
    quantize_model(model, Fp8Recipe(activation_scheme=activation), calib_tokens, progress=False)
    fp8_named = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    fp8_modules = list(fp8_named.values())
    assert len(fp8_modules) == 4 * 2  # qkv, o, gate_up, down per layer
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    assert all(m.weight.dtype == FP8_DTYPE for m in fp8_modules)
    # Static scales everywhere but down_proj (massive activations: dynamic per token there).
    assert all((m.input_scale is not None) == (activation == "static" and not n.endswith("down_proj"))
               for n, m in fp8_named.items())
    ids = tokenizer(CALIBRATION_TEXTS[5])["input_ids"][:96]
    error = _relative_error(_logits(model, ids), _logits(reference, ids))
    # e4m3 keeps 3 mantissa bits: ~5% RMS error per matmul output; a random 2-layer net compounds it to ~13%.
    # A wrong scale anywhere (e.g. a missing 1/448) gives errors of 100% or more.
    assert 0 < error < 0.2, error


def test_fp8_kv_cache_scales_calibrated_per_layer(tiny_dir, tokenizer, calib_tokens):
    reference = load_model(tiny_dir, torch.float32, "cpu")
    model = load_model(tiny_dir, torch.float32, "cpu")
    quantize_model(model, Fp8Recipe(use_fp8=False, kv_cache_dtype="fp8"), calib_tokens, progress=False)
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    scales = [float(layer.k_scale) for layer in model.attention_layers()]
    assert all(s != 1.0 and s > 0 for s in scales) and len(set(scales)) == len(scales)
    ids = tokenizer(CALIBRATION_TEXTS[7])["input_ids"][:96]
    fp8_kv = model.compute_logits(prefill(model, [ids], kv_dtype=FP8_DTYPE))
    assert 0 < _relative_error(fp8_kv, _logits(reference, ids)) < 0.2


def test_static_recipe_without_data_is_refused(tiny_dir):
    model = load_model(tiny_dir, torch.float32, "cpu")
    with pytest.raises(ValueError, match="calibration data"):
        quantize_model(model, Fp8Recipe(), None)


def test_dynamic_nearest_recipe_needs_no_calibration(tiny_dir):
    recipe = Fp8Recipe(activation_scheme="dynamic", weight_rounding="nearest")
    assert not recipe.needs_calibration
    model = quantize_model(load_model(tiny_dir, torch.float32, "cpu"), recipe, None)
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 8


# ---- engine directory round trip ----------------------------------------------------------------------------
def test_build_save_load_round_trip(tiny_dir, tokenizer, tmp_path):
    config = EngineConfig(model=str(tiny_dir), use_fp8=True, kv_cache_dtype="fp8", calibration_samples=6,
                          calibration_max_length=64, device="cpu")
    out = build_fp8_engine(tiny_dir, config, tmp_path / "engine")
    manifest = read_manifest(out)
    assert manifest["identity"]["recipe"]["kv_cache_dtype"] == "fp8"
    assert manifest["identity"]["calibration"]["samples"] == 6
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(manifest["files"])
    model = load_engine(out, torch.float32, "cpu")
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 8
    assert [float(a.k_scale) for a in model.attention_layers()] == manifest["kv_scales"]["k"]
    ids = tokenizer(CALIBRATION_TEXTS[2])["input_ids"][:80]
    first = _logits(model, ids)
    # A second save of the loaded engine (what llm.save does) loads to the same numbers.
    from optimum_nvidia_core.build import save_engine

    again = load_engine(save_engine(model, out, tmp_path / "saved_again"), torch.float32, "cpu")
    assert torch.equal(_logits(again, ids), first)


# ---- perplexity ---------------------------------------------------------------------------------------------
def test_perplexity_matches_transformers_and_chunking(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    ids = tokenizer(" ".join(CALIBRATION_TEXTS[:3]))["input_ids"][:200]
    ours = load_model(tiny_dir, torch.float32, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.exp(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss).item()
    assert perplexity(ours, ids) == pytest.approx(expected, rel=1e-4)
    assert perplexity(ours, ids, chunk_size=37) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(ours, ids[:1])


# ---- device check -------------------------------------------------------------------------------------------
def test_fp8_refused_on_gpu_below_capability_8_9(monkeypatch):
    check_fp8_supported(torch.device("cpu"))  # emulated: fine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match="A100.*8.0.*use_fp8=False"):
        check_fp8_supported(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_supported(torch.device("cuda"))


def test_save_refuses_a_non_engine_directory(tiny_dir, tmp_path):
    from optimum_nvidia_core.build import save_engine

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    model = load_model(tiny_dir, torch.float32, "cpu")
    with pytest.raises(FileExistsError, match="not an engine directory"):
        save_engine(model, tiny_dir, occupied)
    assert (occupied / "notes.txt").read_text() == "keep me"
    saved = save_engine(model, tiny_dir, tmp_path / "plain")  # an unquantized model saves and loads too
    assert read_manifest(saved)["identity"]["recipe"]["use_fp8"] is False
    assert not any(isinstance(m, Fp8Linear) for m in load_engine(saved, torch.float32, "cpu").modules())
