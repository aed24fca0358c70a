"""Calibration: choose the data, tokenize it, and record activation and K/V ranges with forward hooks.

Data: None (the default set in calibration_text.py, needs no download), a list of strings, any iterable of strings,
or a datasets.Dataset / IterableDataset with a "text" column; conversations (lists of {"role", "content"} messages) are
accepted too and go through the model's chat template. The first ``calibration_samples`` non-empty texts are
used, each truncated to ``calibration_max_length`` tokens.

Statistics: the absolute maximum of each quantized linear's input (static activation scales) and of each attention
layer's K and V (FP8 KV-cache scales), over all calibration tokens.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from optimum_nvidia_core.build.calibration_text import CALIBRATION_CONVERSATIONS, CALIBRATION_TEXTS
from optimum_nvidia_core.build.engine_dir import canonical_json
from optimum_nvidia_core.build.scratch_prefill import prefill

# A sample is plain text, or a conversation (OpenAI-style messages) rendered with the model's chat template.
CalibrationSample = Union[str, list]
# Most tokens in one calibration forward pass (several samples share a pass).
TOKENS_PER_PASS = 2048


def default_calibration_samples() -> list[CalibrationSample]:
    # Interleave conversations with prose/code so any prefix of the list covers both.
    samples: list[CalibrationSample] = []
    texts, conversations = list(CALIBRATION_TEXTS), list(CALIBRATION_CONVERSATIONS)
    while texts or conversations:
        samples.extend(texts[:3])
        samples.extend(conversations[:1])
        texts, conversations = texts[3:], conversations[1:]
    return samples


def _sample_of(item: Any, index: int) -> CalibrationSample:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    if isinstance(item, list) and item and all(isinstance(m, dict) and "role" in m and "content" in m for m in item):
        return item  # a conversation: list of {"role", "content"} messages
    raise TypeError(
        f"calibration_dataset item {index} is {type(item).__name__}, not a string: pass a list of strings, an "
        "iterable of strings, or a datasets.Dataset with a 'text' column")


def _is_empty(sample: CalibrationSample) -> bool:
    return not sample.strip() if isinstance(sample, str) else not any(str(m["content"]).strip() for m in sample)


def select_calibration_samples(dataset: Any, num_samples: int) -> list[CalibrationSample]:
    """The first ``num_samples`` non-empty samples of ``dataset`` (None: the built-in default set)."""
    if dataset is None:
        return default_calibration_samples()[:num_samples]
    if isinstance(dataset, (str, bytes)):
        raise TypeError(
            "calibration_dataset is a single string; pass a list of strings (e.g. [text] or "
            "open(path).read().split('\\n\\n')), an iterable of strings, or a datasets.Dataset")
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None and "text" not in column_names:
        raise ValueError(
            f"calibration_dataset has columns {list(column_names)} but no 'text' column; rename the column that "
            "holds the text to 'text' (dataset.rename_column(old, 'text'))")
    if not isinstance(dataset, Iterable):
        raise TypeError(f"calibration_dataset must be iterable (a list of strings, ...), got {type(dataset).__name__}")
    samples: list[CalibrationSample] = []
    for index, item in enumerate(dataset):
        sample = _sample_of(item, index)
        if not _is_empty(sample):
            samples.append(sample)
        if len(samples) >= num_samples:
            break
    if not samples:
        raise ValueError("calibration_dataset has no non-empty text; pass at least one string")
    return samples


def calibration_hash(samples: list[CalibrationSample], max_length: int) -> str:
    """Identifies the calibration data in the engine manifest (and so in the cache key)."""
    return hashlib.sha256(canonical_json({"samples": samples, "max_length": max_length}).encode()).hexdigest()


def tokenize_samples(tokenizer, samples: list[CalibrationSample], max_length: int) -> list[list[int]]:
    """Token ids of each sample, truncated to ``max_length``; conversations go through the chat template."""
    token_lists = []
    for sample in samples:
        if isinstance(sample, list):
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(sample, tokenize=False)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:  # no template: a plain transcript still calibrates on dialogue-shaped text
                text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in sample)
                ids = tokenizer(text)["input_ids"]
        else:
            ids = tokenizer(sample)["input_ids"]
        if len(ids) >= 2:
            token_lists.append(list(ids[:max_length]))
    return token_lists


@dataclass
class CalibrationStats:
    input_absmax: dict[str, float] = field(default_factory=dict)  # linear module name -> max |input|
    k_absmax: list[float] = field(default_factory=list)  # per attention layer, in model.attention_layers() order
    v_absmax: list[float] = field(default_factory=list)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> sum of x^T x, fp32 [K, K] (GPTQ)


def _record_max(store: dict | list, key, tensor: torch.Tensor) -> None:
    value = tensor.detach().abs().amax().float().item()
    store[key] = max(store[key], value)


def _record_hessian(store: dict, name: str, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    x = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
    if weights is not None:  # [T]: each token's weight in the sum
        x = x * weights.sqrt().unsqueeze(1)
    if name in store:
        store[name].addmm_(x.t(), x)
    else:
        store[name] = x.t() @ x


@contextmanager
def recording(
    model: nn.Module, stats: CalibrationStats, linear_names: list[str], attention_layers: list[nn.Module],
    hessian_names: list[str] = (), first_token_weight: float = 1.0,
) -> Iterator[CalibrationStats]:
    """While inside, forward passes record into ``stats``: the input absmax of ``linear_names``, the K/V absmax of
    ``attention_layers`` (stats.k_absmax[i] belongs to attention_layers[i]) and the input Hessians of
    ``hessian_names``. Module names are those of ``model.named_modules()``. ``first_token_weight``: the weight of each
    sequence's first token (position 0, the attention sink, with massive activations at some layers: 94% of
    trace(H) at SmolLM2's last down_proj over 34 samples) in the Hessians; other tokens weigh 1."""
    modules = dict(model.named_modules())
    stats.input_absmax.update({name: 0.0 for name in linear_names})
    stats.k_absmax[:] = [0.0] * len(attention_layers)
    stats.v_absmax[:] = [0.0] * len(attention_layers)
    hooks = []
    for name in linear_names:
        hooks.append(modules[name].register_forward_pre_hook(
            lambda _m, args, name=name: _record_max(stats.input_absmax, name, args[0])))
    rows: dict[str, torch.Tensor] = {}  # "weights": each token's weight in the Hessians this forward pass [T]
    if first_token_weight != 1.0 and hessian_names:  # forward(input_ids, positions, attn): positions [T]
        hooks.append(model.register_forward_pre_hook(lambda _m, args: rows.update(
            weights=torch.where(args[1] == 0, first_token_weight, 1.0))))
    for name in hessian_names:
        hooks.append(modules[name].register_forward_pre_hook(
            lambda _m, args, name=name: _record_hessian(stats.hessians, name, args[0], rows.get("weights"))))
    for i, layer in enumerate(attention_layers):
        # Attention.forward(q, k, v, attn): k and v are this step's new keys/values [T, Hkv, D].
        def record_kv(_m, args, i=i):
            _record_max(stats.k_absmax, i, args[1])
            _record_max(stats.v_absmax, i, args[2])
        hooks.append(layer.register_forward_pre_hook(record_kv))
    try:
        yield stats
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def collect_stats(
    model: nn.Module, linear_names: list[str], token_lists: list[list[int]], progress: bool = True,
    hessian_names: list[str] = (), first_token_weight: float = 1.0,
) -> CalibrationStats:
    """Run every sample through the model (prefill through a scratch paged cache) with hooks recording input
    ranges of ``linear_names``, K/V ranges of every attention layer and input Hessians of ``hessian_names``
    (each sample's first token weighted by ``first_token_weight``: see ``recording``)."""
    from tqdm.auto import tqdm

    stats = CalibrationStats()
    with recording(model, stats, linear_names, model.attention_layers(), hessian_names, first_token_weight):
        bar = tqdm(total=sum(map(len, token_lists)), desc="FP8 calibration", unit="tok", disable=not progress)
        for group in group_by_tokens(token_lists, TOKENS_PER_PASS):
            prefill(model, group)
            bar.update(sum(map(len, group)))
        bar.close()
    return stats


def group_by_tokens(token_lists: list[list[int]], budget: int) -> list[list[list[int]]]:
    groups, current, used = [], [], 0
    for ids in token_lists:
        if current and used + len(ids) > budget:
            groups.append(current)
            current, used = [], 0
        current.append(ids)
        used += len(ids)
    if current:
        groups.append(current)
    return groups
