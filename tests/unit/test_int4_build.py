"""INT4 at build time: rounding methods, AWQ scale folding, the engine build, its cache, and LLM(quantization="int4")."""
from __future__ import annotations

import pytest
import torch

from int4_checkpoints import write_int4_checkpoint
from optimum_nvidia_core.build import get_or_build, load_engine
from optimum_nvidia_core.build import int4_rounding as rounding
from optimum_nvidia_core.build.calibration import default_calibration_samples, tokenize_samples
from optimum_nvidia_core.build.int4 import Int4Recipe, apply_awq_scales, quantize_model_int4
from optimum_nvidia_core.build.int4_build import build_int4_engine
from optimum_nvidia_core.build.scratch_prefill import prefill
from optimum_nvidia_core.config import EngineConfig
from optimum_nvidia_core.layers.int4_linear import Int4Linear
from optimum_nvidia_core.models.loader import load_model
from tiny_models import write_tiny_checkpoint, write_tiny_tokenizer

PROMPTS = [[1, 5, 9, 200, 31, 7, 99, 3] * 3, [4, 8, 15, 16, 23, 42]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Llama 2 style (MHA: o_proj gets AWQ scales too), in_features 128 and 256: real 128-wide groups."""
    out = tmp_path_factory.mktemp("int4_tiny")
    write_tiny_checkpoint(out, "llama2", seed=0, hidden_size=128, intermediate_size=256, head_dim=32)
    write_tiny_tokenizer(out)
    return out


def calibration(model_dir, count: int = 8, max_length: int = 64):
    from transformers import AutoTokenizer

    return tokenize_samples(AutoTokenizer.from_pretrained(str(model_dir)), default_calibration_samples()[:count],
                            max_length)


def logits(model) -> torch.Tensor:
    return model.compute_logits(prefill(model, PROMPTS))


def _inputs_with_outliers(tokens: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=generator) @ (torch.eye(k) + 0.1 * torch.randn(k, k, generator=generator))
    x[:, :4] *= 20.0  # a few channels with massive activations, as in real LLMs
    return x


def test_rtn_round_trip_error_is_bounded():
    weight = torch.randn(64, 256)
    scales, zeros = rounding.group_params(weight, 128, torch.float32)
    codes = rounding.round_to_codes(weight, scales, zeros)
    error = (rounding.dequantize_codes(codes, scales, zeros) - weight).abs()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert bool((error <= scales.repeat_interleave(128, dim=1) / 2 + 1e-6).all())  # half a step, at most


@pytest.mark.parametrize("method", ["awq", "clip", "gptq", "bounded", "awq_gptq"])
def test_calibrated_rounding_beats_rtn_on_held_out_inputs(method):
    torch.manual_seed(0)
    weight = 0.05 * torch.randn(96, 256)
    inputs = _inputs_with_outliers(2560, 256, seed=1)  # one distribution: calibrate on 2048, score on the rest
    x, held_out = inputs[:2048], inputs[2048:]
    hessian = x.t() @ x

    def error(dequantized):
        return ((held_out @ (dequantized - weight).t()).norm() / (held_out @ weight.t()).norm()).item()

    rtn = error(rounding.fake_quantize(weight, 128, torch.float32))
    if method == "awq":
        scales = rounding.awq_input_scales(weight, hessian, 128, torch.float32)
        ours = error(rounding.fake_quantize(weight * scales, 128, torch.float32) / scales)
    elif method == "clip":
        ratios = rounding.clip_ratios(weight, hessian, 128, torch.float32)
        ours = error(rounding.fake_quantize(weight, 128, torch.float32, ratios))
    elif method == "gptq":
        params = rounding.group_params(weight, 128, torch.float32)
        ours = error(rounding.dequantize_codes(rounding.gptq_codes(weight, hessian, *params), *params))
    elif method == "bounded":  # GPTQ that only picks each weight's rounding direction
        params = rounding.group_params(weight, 128, torch.float32)
        codes = rounding.gptq_codes(weight, hessian, *params, bounded=True)
        nearest = rounding.round_to_codes(weight, *params)
        assert int((codes.int() - nearest.int()).abs().max()) == 1  # floor or ceil of w / scale, never further
        ours = error(rounding.dequantize_codes(codes, *params))
    else:  # GPTQ on W diag(s), with the Hessian of the inputs divided by s
        scales = rounding.awq_input_scales(weight, hessian, 128, torch.float32)
        scaled, scaled_hessian = weight * scales, hessian / scales[:, None] / scales[None, :]
        params = rounding.group_params(scaled, 128, torch.float32)
        codes = rounding.gptq_codes(scaled, scaled_hessian, *params)
        ours = error(rounding.dequantize_codes(codes, *params) / scales)
    assert ours < 0.9 * rtn, (method, ours, rtn)


def test_awq_scale_folding_keeps_the_high_precision_function(tiny_dir):
    from optimum_nvidia_core.build.calibration import collect_stats
    from optimum_nvidia_core.build.quantize import quantizable_linear_names

    model = load_model(tiny_dir, torch.float32, "cpu")
    before = logits(model)
    names = quantizable_linear_names(model)
    stats = collect_stats(model, [], calibration(tiny_dir, 4), progress=False, hessian_names=names)
    apply_awq_scales(model, stats.hessians, 128)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight,
                           load_model(tiny_dir, torch.float32, "cpu").model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-4)


def test_quantized_models_are_int4_and_sane(tiny_dir):
    """Every decoder linear becomes a 128-group Int4Linear. This random 2-layer model amplifies any weight error
    (its logits move ~45% under any 4-bit rounding) and ~500 calibration tokens over-fit GPTQ, so the bound only
    rules out broken formats (~100%+). Which method is best is measured on SmolLM2 (test_int4_quality.py)."""
    reference = logits(load_model(tiny_dir, torch.float32, "cpu"))
    errors = {}
    for method in ("rtn", "awq", "gptq", "awq_gptq", "awq_bounded"):
        model = quantize_model_int4(load_model(tiny_dir, torch.float32, "cpu"), Int4Recipe(method),
                                    calibration(tiny_dir), progress=False)
        linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
        assert len(linears) == 4 * len(model.model.layers) and all(m.group_size == 128 for m in linears)
        errors[method] = ((logits(model) - reference).norm() / reference.norm()).item()
    assert all(0 < error < 0.6 for error in errors.values()), errors


def test_int4_engine_saves_loads_and_is_cached(tiny_dir, tmp_path):
    calls = []

    def counted(model_dir, config, out_dir):
        calls.append(out_dir)
        return build_int4_engine(model_dir, config, out_dir)

    config = EngineConfig(model=str(tiny_dir), quantization="int4", device="cpu", calibration_samples=4,
                          calibration_max_length=32)
    first = get_or_build(tiny_dir, config, counted, cache_root=tmp_path)
    assert get_or_build(tiny_dir, config.model_copy(update={"max_batch_size": 3}), counted,
                        cache_root=tmp_path) == first
    assert len(calls) == 1
    other = get_or_build(tiny_dir, EngineConfig(**{**config.model_dump(), "int4_method": "rtn"}), counted,
                         cache_root=tmp_path)
    fp8 = get_or_build(tiny_dir, EngineConfig(model=str(tiny_dir), use_fp8=True, device="cpu",
                                              calibration_samples=4, calibration_max_length=32),
                       cache_root=tmp_path)
    assert len({first, other, fp8}) == 3 and len(calls) == 2  # each recipe is its own engine
    loaded = load_engine(first, torch.float32, "cpu")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, Int4Linear)
    built = quantize_model_int4(load_model(tiny_dir, torch.float32, "cpu"), Int4Recipe(config.int4_method),
                                calibration(tiny_dir, 4, 32), progress=False)
    torch.testing.assert_close(logits(loaded), logits(built), rtol=0, atol=0)  # the saved engine is the build


def test_llm_int4_generates_and_reloads_from_cache(tiny_dir, tmp_path, monkeypatch):
    from optimum_nvidia_core import LLM, SamplingParams

    monkeypatch.setenv("OPTIMUM_NVIDIA_CACHE", str(tmp_path / "cache"))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    options = dict(quantization="int4", int4_method="rtn", device="cpu", max_batch_size=4, max_num_tokens=64)
    llm = LLM(str(tiny_dir), **options)
    first = llm.generate(["Paris is the capital of"], params)[0]
    llm.shutdown()
    engines = sorted(p for p in (tmp_path / "cache" / "engines").iterdir() if p.is_dir())
    assert [_recipe(e)["quantization"] for e in engines] == ["int4"]  # what the engine core loaded
    llm = LLM(str(tiny_dir), **options)  # a fresh engine: loaded from the cache, not rebuilt
    assert llm.generate(["Paris is the capital of"], params)[0].token_ids == first.token_ids
    llm.shutdown()
    assert sorted(p for p in (tmp_path / "cache" / "engines").iterdir() if p.is_dir()) == engines
    assert len(first.token_ids) == 8


def test_llm_loads_awq_checkpoint_and_refuses_fp8_on_it(tmp_path):
    from optimum_nvidia_core import LLM, SamplingParams

    write_int4_checkpoint(tmp_path / "awq", tmp_path / "ref", "awq")
    write_tiny_tokenizer(tmp_path / "awq")
    llm = LLM(str(tmp_path / "awq"), device="cpu", max_batch_size=2, max_num_tokens=64)
    params = SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0)
    out = llm.generate(["Hello"], params)[0]
    assert len(out.token_ids) == 4
    engine_dir = llm.save(tmp_path / "engine")  # a loaded AWQ checkpoint saves as an INT4 engine
    llm.shutdown()
    assert _recipe(engine_dir)["quantization"] == "int4"  # the engine core loaded Int4Linear modules
    llm = LLM(str(engine_dir), device="cpu", max_batch_size=2, max_num_tokens=64)
    assert llm.generate(["Hello"], params)[0].token_ids == out.token_ids
    llm.shutdown()
    with pytest.raises(ValueError, match="AWQ INT4 checkpoint"):
        LLM(str(tmp_path / "awq"), use_fp8=True, device="cpu")


def _recipe(engine_dir) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(engine_dir) / "manifest.json").read_text())["identity"]["recipe"]
