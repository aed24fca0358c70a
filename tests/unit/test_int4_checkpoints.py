"""AWQ and GPTQ checkpoints (tiny, random, in the quantizers' on-disk layouts) load through the normal loader and
compute what their dequantized weights compute."""
from __future__ import annotations

import json

import pytest
import torch

from int4_checkpoints import write_int4_checkpoint
from optimum_nvidia_core.build.scratch_prefill import prefill
from optimum_nvidia_core.layers.int4_linear import Int4Linear, dequantize, pack_codes, unpack_codes
from optimum_nvidia_core.layers.linear import Linear
from optimum_nvidia_core.models.int4_formats import UnsupportedQuantization
from optimum_nvidia_core.models.loader import load_model

PROMPTS = [[1, 5, 9, 200, 31, 7, 99, 3], [4, 8, 15, 16, 23, 42]]


def logits(model) -> torch.Tensor:
    return model.compute_logits(prefill(model, PROMPTS))


def quantized_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, Int4Linear)]


def test_pack_unpack_roundtrip_and_bit_positions():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes)), codes)
    single = torch.zeros(1, 8, dtype=torch.uint8)
    single[0, 7] = 0xF  # code 7 of a word sits in its top nibble: the sign bit of the int32
    assert pack_codes(single).item() == -(1 << 28)


def test_dequantize_formula():
    codes = torch.tensor([[0, 15] * 16])  # one row, one group of 32
    weight = dequantize(pack_codes(codes), torch.tensor([[0.5]]), torch.tensor([[8]], dtype=torch.uint8),
                        torch.float32)
    assert weight[0, :2].tolist() == [-4.0, 3.5]


@pytest.mark.parametrize("method,kwargs", [
    ("awq", {}),
    ("awq", dict(family="qwen2")),  # q/k/v biases next to packed weights
    ("gptq", dict(sym=False)),
    ("gptq", dict(sym=True)),
    ("gptq", dict(checkpoint_format="gptq_v2")),
    ("gptq", dict(group_size=32, family="llama_bias")),
    ("gptq", dict(group_size=-1, family="smollm2", hidden_size=96, head_dim=16)),
])
def test_int4_checkpoint_matches_dequantize_then_matmul(tmp_path, method, kwargs):
    config = write_int4_checkpoint(tmp_path / "q", tmp_path / "ref", method, **kwargs)
    model = load_model(tmp_path / "q", torch.float32, "cpu")
    reference = load_model(tmp_path / "ref", torch.float32, "cpu")
    names = quantized_names(model)
    assert len(names) == 4 * config.num_hidden_layers and not isinstance(model.lm_head, Int4Linear)
    for name in names:  # every weight, bit for bit: layouts, nibble order and zero convention all right
        torch.testing.assert_close(model.get_submodule(name).dequantized_weight(),
                                   reference.get_submodule(name).weight, rtol=0, atol=0)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-4)


def test_wrong_zero_convention_would_be_caught(tmp_path):
    """A GPTQ v1 checkpoint read as v2 gives other weights: the fixture really distinguishes the conventions."""
    write_int4_checkpoint(tmp_path / "q", tmp_path / "ref", "gptq")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    path.write_text(json.dumps(config))
    model, reference = load_model(tmp_path / "q", torch.float32, "cpu"), load_model(tmp_path / "ref",
                                                                                     torch.float32, "cpu")
    name = quantized_names(model)[0]
    assert not torch.equal(model.get_submodule(name).dequantized_weight(), reference.get_submodule(name).weight)


def _edit_quant_config(tmp_path, method: str, **changes):
    write_int4_checkpoint(tmp_path / "q", tmp_path / "ref", method)
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))
    return tmp_path / "q"


@pytest.mark.parametrize("method,changes,named", [
    ("gptq", dict(desc_act=True), "desc_act=True"),
    ("gptq", dict(bits=8), "bits=8"),
    ("gptq", dict(checkpoint_format="marlin"), "checkpoint_format='marlin'"),
    ("awq", dict(version="gemv"), "version='gemv'"),
    ("awq", dict(zero_point=False), "zero_point=False"),
    ("awq", dict(group_size=100), "group_size=100"),
])
def test_unsupported_quantization_is_named(tmp_path, method, changes, named):
    with pytest.raises(UnsupportedQuantization, match=named.replace("(", r"\(")):
        load_model(_edit_quant_config(tmp_path, method, **changes), torch.float32, "cpu")


def test_reordered_g_idx_is_refused(tmp_path):
    """desc_act=False in the config but a shuffled g_idx on disk: refused, never silently wrong."""
    from safetensors.torch import load_file, save_file

    write_int4_checkpoint(tmp_path / "q", tmp_path / "ref", "gptq")
    file = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(file))
    name = next(n for n in tensors if n.endswith("g_idx"))
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(file))
    with pytest.raises(UnsupportedQuantization, match="desc_act"):
        load_model(tmp_path / "q", torch.float32, "cpu")


def test_missing_scales_fail_like_any_missing_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    write_int4_checkpoint(tmp_path / "q", tmp_path / "ref", "awq")
    file = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.layers.0.mlp.up_proj.scales"]
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match="missing"):
        load_model(tmp_path / "q", torch.float32, "cpu")


def test_modules_to_not_convert_stay_high_precision(tmp_path):
    """AWQ's modules_to_not_convert: those projections are plain weights in the checkpoint and Linear here."""
    from safetensors.torch import load_file, save_file

    write_int4_checkpoint(tmp_path / "q", tmp_path / "ref", "awq")
    reference = load_file(str(tmp_path / "ref" / "model.safetensors"))
    file = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(file))
    for part in ("gate_proj", "up_proj"):
        prefix = f"model.layers.1.mlp.{part}"
        for leaf in ("qweight", "qzeros", "scales"):
            del tensors[f"{prefix}.{leaf}"]
        tensors[f"{prefix}.weight"] = reference[f"{prefix}.weight"]
    save_file(tensors, str(file))
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]
    path.write_text(json.dumps(config))
    model = load_model(tmp_path / "q", torch.float32, "cpu")
    assert type(model.model.layers[1].mlp.gate_up_proj) is Linear
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, Int4Linear)
    torch.testing.assert_close(logits(model), logits(load_model(tmp_path / "ref", torch.float32, "cpu")),
                               rtol=1e-4, atol=1e-4)
