"""Pre-quantized FP8 checkpoints (llm-compressor compressed-tensors, NVIDIA ModelOpt) written in their on-disk
layouts by benchmarks/fp8_checkpoint_writer.py, loaded through the engine's loader, checked against the files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_config, write_tiny_tokenizer

from optimum_nvidia_core.build.scratch_prefill import prefill
from optimum_nvidia_core.config import EngineConfig
from optimum_nvidia_core.engine.loading import load
from optimum_nvidia_core.layers.fp8_linear import FP8_DTYPE, Fp8Linear
from benchmarks.fp8_checkpoint_writer import write_fp8_checkpoint
from optimum_nvidia_core.models.fp8_formats import UnsupportedFp8Checkpoint, checkpoint_format
from optimum_nvidia_core.models.loader import load_model

PROBE = [5, 17, 200, 33, 41, 7, 99, 123, 250, 3, 64, 77, 300, 12, 8, 150]
SCHEMES = [  # (producer, weight scale, static activations, FP8 KV scales, family)
    ("compressed-tensors", "tensor", True, True, "llama3"),  # "FP8" with a KV-cache scheme
    ("compressed-tensors", "channel", False, False, "qwen2"),  # "FP8_DYNAMIC" (biases on q/k/v)
    ("modelopt", "tensor", True, True, "llama3"),  # quant_algo FP8 + kv_cache_quant_algo FP8
    ("modelopt", "channel", False, False, "smollm2"),  # FP8_PER_CHANNEL_PER_TOKEN, tied embeddings
]


def _write(tmp_path: Path, producer="compressed-tensors", weight_scale="tensor", static=True, kv=True,
           family="llama3", **options) -> Path:
    out = tmp_path / f"{producer}-{weight_scale}-{family}"
    write_fp8_checkpoint(tiny_config(family), out, producer, weight_scale, static, kv, std=0.15, seed=1, **options)
    write_tiny_tokenizer(out)
    return out


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _dequantized_reference(model_dir: Path, tmp_path: Path):
    """The same weights in fp32 (e4m3 code * scale), as a plain checkpoint: what the FP8 model approximates."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    tensors, plain = _tensors(model_dir), {}
    for name, tensor in tensors.items():
        stem, _, leaf = name.rpartition(".")
        if leaf == "weight" and tensor.dtype == FP8_DTYPE:
            scale = tensors[f"{stem}.weight_scale"].float()
            plain[name] = tensor.float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)
        elif "scale" not in leaf:
            plain[name] = tensor.float()
    out = tmp_path / "dequantized"
    out.mkdir()
    save_file(plain, str(out / "model.safetensors"))
    config = AutoConfig.from_pretrained(str(model_dir))
    del config.quantization_config
    config.save_pretrained(str(out))
    return load_model(out, torch.float32, "cpu")


@pytest.mark.parametrize("producer, weight_scale, static, kv, family", SCHEMES)
def test_fp8_checkpoint_loads_as_written(tmp_path, producer, weight_scale, static, kv, family):
    model_dir = _write(tmp_path, producer, weight_scale, static, kv, family)
    fmt = checkpoint_format(model_dir)
    assert (fmt.producer, fmt.weight_scale, fmt.static_activations, fmt.kv_cache) == \
        ({"modelopt": "ModelOpt"}.get(producer, producer), weight_scale, static, kv)
    loaded = load(EngineConfig(model=str(model_dir), device="cpu", kv_cache_dtype="fp8" if kv else "auto"))
    model, files = loaded.model, _tensors(model_dir)
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == 4 * model.config.num_hidden_layers
    qkv = fp8["model.layers.1.self_attn.qkv_proj"]
    parts = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    # The fused weight is the parts' e4m3 codes as stored, each part's rows scaled by its own scale(s).
    assert torch.equal(qkv.weight.view(torch.uint8), torch.cat([files[f"{p}.weight"] for p in parts]).view(
        torch.uint8))
    rows = [files[f"{p}.weight"].shape[0] for p in parts]
    expected_scale = torch.cat([files[f"{p}.weight_scale"].float().reshape(-1).expand(r) for p, r in zip(parts, rows)])
    assert torch.equal(qkv.weight_scale, expected_scale)
    if static:  # static activations everywhere (down_proj too); a fused input takes the max of its parts' scales
        assert all(m.input_scale is not None for m in fp8.values())
        assert float(qkv.input_scale) == max(float(files[f"{p}.input_scale"].float()) for p in parts)
    else:
        assert all(m.input_scale is None for m in fp8.values())
    k_name = "model.layers.1.self_attn.k_scale" if producer == "compressed-tensors" else \
        "model.layers.1.self_attn.k_proj.k_scale"
    k_scale = float(model.attention_layers()[1].k_scale)
    assert k_scale == (float(files[k_name].float()) if kv else 1.0)
    # End to end: close to the dequantized weights in high precision (activation rounding only); a misread scale
    # (divided instead of multiplied, one part's scale on another's rows) is off by 100% or more.
    reference = _dequantized_reference(model_dir, tmp_path)
    ours = model.compute_logits(prefill(model, [PROBE], kv_dtype=FP8_DTYPE if kv else None))
    theirs = reference.compute_logits(prefill(reference, [PROBE]))
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.2


@pytest.mark.parametrize("producer", ["compressed-tensors", "modelopt"])
def test_on_disk_layout_matches_the_public_releases(tmp_path, producer):
    model_dir = _write(tmp_path, producer)
    files = _tensors(model_dir)
    layer = "model.layers.0.self_attn"
    assert files[f"{layer}.q_proj.weight"].dtype == FP8_DTYPE
    assert "lm_head.weight" in files and files["lm_head.weight"].dtype == torch.bfloat16
    if producer == "compressed-tensors":  # scales in the checkpoint dtype, shape [1]; KV scales on self_attn
        assert files[f"{layer}.q_proj.weight_scale"].dtype == torch.bfloat16
        assert files[f"{layer}.q_proj.weight_scale"].shape == (1,)
        assert files[f"{layer}.q_proj.input_scale"].shape == (1,) and f"{layer}.k_scale" in files
        config = json.loads((model_dir / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == "float-quantized"
    else:  # fp32 scalars; KV scales on k_proj / v_proj; hf_quant_config.json next to config.json
        assert files[f"{layer}.q_proj.weight_scale"].dtype == torch.float32
        assert files[f"{layer}.q_proj.weight_scale"].shape == ()
        assert files[f"{layer}.k_proj.k_scale"].shape == () and f"{layer}.v_proj.v_scale" in files
        legacy = json.loads((model_dir / "hf_quant_config.json").read_text())
        assert legacy["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                                          "exclude_modules": ["lm_head"]}


def test_modelopt_with_only_hf_quant_config_json(tmp_path):
    model_dir = _write(tmp_path, "modelopt", modelopt_in_config=False)  # older exports: no quantization_config
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    loaded = load(EngineConfig(model=str(model_dir), device="cpu"))
    assert sum(isinstance(m, Fp8Linear) for m in loaded.model.modules()) == 8


def test_llm_serves_and_saves_an_fp8_checkpoint(tmp_path):
    from optimum_nvidia_core import LLM, SamplingParams

    model_dir = _write(tmp_path)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm = LLM(str(model_dir), device="cpu", max_seq_len=64, kv_cache_dtype="fp8")
    try:
        first = llm.generate(["hello there"], greedy)[0].token_ids
        assert len(first) == 6
        saved = llm.save(tmp_path / "engine")
    finally:
        llm.shutdown()
    again = LLM(str(saved), device="cpu", max_seq_len=64, kv_cache_dtype="fp8")
    try:
        assert again.generate(["hello there"], greedy)[0].token_ids == first
    finally:
        again.shutdown()


def _edit_quantization_config(model_dir: Path, edit) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("edit, message", [
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="block", block_structure=[128, 128]),
     "strategy='block'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), "asymmetric weights"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations=None), "W8A16"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(strategy="group", group_size=128),
     "group_size=128"),
    (lambda q: q["kv_cache_scheme"].update(num_bits=4), "kv_cache_scheme type='float', num_bits=4"),
    (lambda q: q.update(format="nvfp4-pack-quantized"), "format='nvfp4-pack-quantized'"),
])
def test_unsupported_compressed_tensors_schemes_name_the_field(tmp_path, edit, message):
    model_dir = _write(tmp_path)
    _edit_quantization_config(model_dir, edit)
    with pytest.raises(UnsupportedFp8Checkpoint, match=message.replace("[", r"\[")):
        load(EngineConfig(model=str(model_dir), device="cpu"))


def test_unsupported_modelopt_algorithm_is_named(tmp_path):
    model_dir = _write(tmp_path, "modelopt")
    _edit_quantization_config(model_dir, lambda q: q.update(quant_algo="NVFP4"))
    with pytest.raises(UnsupportedFp8Checkpoint, match="quant_algo='NVFP4'"):
        load(EngineConfig(model=str(model_dir), device="cpu"))


def test_integer_schemes_are_not_claimed_as_fp8(tmp_path):
    model_dir = _write(tmp_path)
    _edit_quantization_config(model_dir, lambda q: q["config_groups"]["group_0"]["weights"].update(
        type="int", num_bits=4))
    assert checkpoint_format(model_dir) is None  # W4A16 and friends belong to the INT4 loader


def test_fp8_kv_cache_without_checkpoint_scales_is_refused(tmp_path):
    model_dir = _write(tmp_path, kv=False)
    with pytest.raises(UnsupportedFp8Checkpoint, match="kv_cache_dtype='fp8' needs FP8 KV-cache scales"):
        load(EngineConfig(model=str(model_dir), device="cpu", kv_cache_dtype="fp8"))


def test_missing_scale_and_wrong_dtype_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    model_dir = _write(tmp_path)
    tensors = _tensors(model_dir)
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.mlp\.up_proj\.weight_scale'\]"):
        load(EngineConfig(model=str(model_dir), device="cpu"))
    tensors = _tensors(_write(tmp_path / "second"))
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].to(
        torch.float8_e5m2)
    save_file(tensors, str(tmp_path / "second" / "compressed-tensors-tensor-llama3" / "model.safetensors"))
    with pytest.raises(UnsupportedFp8Checkpoint, match="down_proj.weight is float8_e5m2"):
        load(EngineConfig(model=str(tmp_path / "second" / "compressed-tensors-tensor-llama3"), device="cpu"))


def test_building_an_fp8_checkpoint_again_is_refused(tmp_path):
    from optimum_nvidia_core.build import build_fp8_engine

    model_dir = _write(tmp_path)
    with pytest.raises(ValueError, match="already an FP8 checkpoint .compressed-tensors.; there is nothing to build"):
        build_fp8_engine(model_dir, EngineConfig(model=str(model_dir), use_fp8=True, device="cpu"), tmp_path / "e")
