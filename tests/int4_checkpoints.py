"""Tiny random AWQ and GPTQ checkpoints in the exact on-disk layouts the quantizers write, and their reference.

Written from the layouts' definitions (AutoAWQ GEMM packing order, AutoGPTQ / transformers GPTQ packing), with
int64 arithmetic and explicit loops: independent of the engine's converters, which the tests check against them.
Each fixture also writes the dequantized weights as a plain checkpoint: the dequantize-then-matmul reference.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from tiny_models import tiny_config

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_along_columns(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """[R, C] in 0..15 -> int32 [R, C/8]; nibble i of word c holds column 8c + order[i]."""
    rows, cols = values.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            words[:, c] |= values[:, 8 * c + order[i]].to(torch.int64) << (4 * i)
    return _to_int32(words)


def pack_along_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] in 0..15 -> int32 [R/8, C]; nibble i of word r holds row 8r + i (GPTQ qweight)."""
    rows, cols = values.shape
    words = torch.zeros(rows // 8, cols, dtype=torch.int64)
    for r in range(rows // 8):
        for i in range(8):
            words[r] |= values[8 * r + i].to(torch.int64) << (4 * i)
    return _to_int32(words)


def int4_config(method: str, family: str = "llama3", group_size: int = 128, sym: bool = False,
                checkpoint_format: str = "gptq", **overrides):
    """A tiny config whose linears' in_features fit ``group_size`` (128 by default), with quantization_config."""
    config = tiny_config(family, **{**dict(hidden_size=128, intermediate_size=256, head_dim=32), **overrides})
    if method == "awq":
        config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                      "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    else:
        config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": sym,
                                      "desc_act": False, "checkpoint_format": checkpoint_format}
    return config


def _quantized_linear(name: str, n: int, k: int, method: str, group: int, sym: bool, v1: bool, gen):
    """Random codes, zeros and scales of one linear -> (checkpoint tensors, reference weight [N, K] fp32)."""
    group = k if group == -1 else group
    codes = torch.randint(0, 16, (k, n), generator=gen)  # [K, N]: the quantizers' orientation
    zeros = torch.full((k // group, n), 8) if sym else torch.randint(0, 16, (k // group, n), generator=gen)
    scales = (0.004 + 0.02 * torch.rand(k // group, n, generator=gen)).to(torch.float16)
    per_input = torch.arange(k) // group
    reference = ((codes - zeros[per_input]).double() * scales.double()[per_input]).t().float().contiguous()
    if method == "awq":
        tensors = {"qweight": pack_along_columns(codes, AWQ_ORDER), "qzeros": pack_along_columns(zeros, AWQ_ORDER)}
    else:
        stored = (zeros - 1) & 0xF if v1 else zeros  # GPTQ v1 stores zero - 1 (wrapping in 4 bits)
        tensors = {"qweight": pack_along_rows(codes), "qzeros": pack_along_columns(stored, tuple(range(8))),
                   "g_idx": per_input.to(torch.int32)}
    tensors["scales"] = scales
    return {f"{name}.{leaf}": t for leaf, t in tensors.items()}, reference


def write_int4_checkpoint(out_dir: Path, reference_dir: Path, method: str, group_size: int = 128, sym: bool = False,
                          checkpoint_format: str = "gptq", family: str = "llama3", seed: int = 0, **overrides):
    """Write a random ``method`` ("awq" | "gptq") checkpoint to out_dir and its dequantized twin (a plain fp32
    checkpoint, same config without quantization_config) to reference_dir. Returns the config."""
    from safetensors.torch import save_file

    from benchmarks.checkpoint import hf_weight_shapes

    config = int4_config(method, family, group_size, sym, checkpoint_format, **overrides)
    gen = torch.Generator().manual_seed(seed)
    quantized, plain = {}, {}
    for name, shape in hf_weight_shapes(config).items():
        module, leaf = name.rsplit(".", 1)
        if module.split(".")[-1] in QUANTIZED and leaf == "weight":
            tensors, plain[name] = _quantized_linear(module, *shape, method, group_size, sym,
                                                     checkpoint_format == "gptq", gen)
            quantized.update(tensors)
            continue
        base = 1.0 if name.endswith("norm.weight") else 0.0
        plain[name] = base + 0.1 * torch.randn(shape, generator=gen)
        stored = plain[name].to(torch.float16)  # quantized checkpoints keep the rest in fp16
        plain[name] = stored.float()
        quantized[name] = stored
    for directory, tensors, cfg in ((out_dir, quantized, config), (reference_dir, plain, _without_quant(config))):
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(str(directory))
    return config


def _without_quant(config):
    plain = copy.deepcopy(config)
    del plain.quantization_config
    return plain
