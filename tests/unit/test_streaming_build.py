"""The layer-by-layer FP8 build (build/streaming.py) against the whole-model build (quantize_model) on tiny random
checkpoints: the same engine, one decoder layer on the device at a time, clear errors for mismatched checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import write_tiny_checkpoint, write_tiny_tokenizer

from optimum_nvidia_core.build import Fp8Recipe, build_fp8_engine, load_engine, quantize_model
from optimum_nvidia_core.build import streaming
from optimum_nvidia_core.build.calibration import select_calibration_samples, tokenize_samples
from optimum_nvidia_core.build.scratch_prefill import prefill
from optimum_nvidia_core.config import EngineConfig
from optimum_nvidia_core.layers.fp8_linear import Fp8Linear
from optimum_nvidia_core.models.loader import load_model

SAMPLES, MAX_LENGTH = 8, 96
PROBE = [5, 17, 200, 33, 41, 7, 99, 123, 250, 3, 64, 77, 300, 12, 8, 150]


def _checkpoint(tmp_path: Path, family: str) -> Path:
    out = tmp_path / family
    write_tiny_checkpoint(out, family, seed=3, num_hidden_layers=3)
    write_tiny_tokenizer(out)
    return out


def _whole_model_build(model_dir: Path, recipe: Fp8Recipe) -> torch.nn.Module:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = tokenize_samples(tokenizer, select_calibration_samples(None, SAMPLES), MAX_LENGTH)
    return quantize_model(load_model(model_dir, torch.float32, "cpu"), recipe,
                          tokens if recipe.needs_calibration else None, progress=False)


def _config(model_dir: Path, **options) -> EngineConfig:
    return EngineConfig(model=str(model_dir), use_fp8=options.pop("use_fp8", True), device="cpu",
                        calibration_samples=SAMPLES, calibration_max_length=MAX_LENGTH, **options)


def _logits(model) -> torch.Tensor:
    return model.compute_logits(prefill(model, [PROBE], kv_dtype=_kv_dtype(model)))


def _kv_dtype(model):
    return torch.float8_e4m3fn if float(model.attention_layers()[0].k_scale) != 1.0 else None


@pytest.mark.parametrize("family, options", [
    ("llama3", dict(kv_cache_dtype="fp8")),  # GPTQ, static activations, FP8 KV cache
    ("smollm2", dict(activation_scheme="dynamic")),  # tied embeddings, GPTQ with dynamic activations
    ("qwen2", dict(activation_scheme="dynamic", weight_rounding="nearest")),  # biases; no calibration at all
    ("llama2", dict(use_fp8=False, kv_cache_dtype="fp8")),  # only the KV cache is FP8
])
def test_streaming_build_equals_whole_model_build(tmp_path, family, options):
    model_dir = _checkpoint(tmp_path, family)
    config = _config(model_dir, **options)
    engine = load_engine(build_fp8_engine(model_dir, config, tmp_path / "engine"), torch.float32, "cpu")
    reference = _whole_model_build(model_dir, Fp8Recipe.from_config(config))
    assert [float(a.k_scale) for a in engine.attention_layers()] == \
        [float(a.k_scale) for a in reference.attention_layers()]
    for (name, mine), (_, theirs) in zip(engine.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(mine.float(), theirs.float()), name
    assert torch.equal(_logits(engine), _logits(reference))
    assert sum(isinstance(m, Fp8Linear) for m in engine.modules()) == (12 if config.use_fp8 else 0)


def test_only_one_layer_is_materialized_at_a_time(tmp_path, monkeypatch):
    model_dir = _checkpoint(tmp_path, "llama3")
    seen = []
    calibrate = streaming._calibrate_layer

    def checked(model, index, batches, recipe):
        on_device = [i for i, layer in enumerate(model.model.layers)
                     if any(not t.is_meta for t in list(layer.parameters()) + list(layer.buffers()))]
        seen.append(on_device)
        assert model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta
        return calibrate(model, index, batches, recipe)

    monkeypatch.setattr(streaming, "_calibrate_layer", checked)
    build_fp8_engine(model_dir, _config(model_dir), tmp_path / "engine")
    assert seen == [[0], [1], [2]]


def test_unknown_checkpoint_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = _checkpoint(tmp_path, "llama3")
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.layers.7.mlp.up_proj.weight"] = torch.zeros(4, 4)  # a layer config.json does not have
    save_file(weights, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unknown tensors \['model\.layers\.7\.mlp\.up_proj\.weight'\]"):
        build_fp8_engine(model_dir, _config(model_dir), tmp_path / "engine")


def test_missing_layer_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = _checkpoint(tmp_path, "llama3")
    weights = load_file(str(model_dir / "model.safetensors"))
    del weights["model.layers.1.self_attn.v_proj.weight"]
    save_file(weights, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \[\('model\.layers\.1\.self_attn\.qkv_proj\.weight', 2\)\]"):
        build_fp8_engine(model_dir, _config(model_dir), tmp_path / "engine")
    assert not (tmp_path / "engine").exists()  # nothing half-built under the final name


def test_engine_index_naming_a_file_outside_is_refused(tmp_path):
    from optimum_nvidia_core.build import EngineDirError

    model_dir = _checkpoint(tmp_path, "llama3")
    engine = build_fp8_engine(model_dir, _config(model_dir, activation_scheme="dynamic",
                                                 weight_rounding="nearest"), tmp_path / "engine")
    index = engine / streaming.INDEX_NAME
    content = json.loads(index.read_text())
    content["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(EngineDirError, match="outside the engine directory"):
        load_engine(engine, torch.float32, "cpu", verify=False)
