"""Perplexity with the model's own forward (chunked prefill through a scratch paged cache).

Used by the FP8 quality gate and by ``LLM.perplexity(text)`` so users can check FP8 quality on their own data.
Texts longer than the model's context are scored in consecutive windows (each starts with a fresh cache).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from optimum_nvidia_core.build.scratch_prefill import chunked_prefill


@torch.no_grad()
def negative_log_likelihood(
    model: nn.Module, token_ids: list[int], chunk_size: int = 512, kv_dtype: torch.dtype | None = None
) -> tuple[float, int]:
    """Summed NLL (nats) of tokens 1.. given their prefix, and how many tokens were scored."""
    total, count = 0.0, 0
    for start, hidden in chunked_prefill(model, token_ids, chunk_size, kv_dtype):
        # hidden row j predicts token start + j + 1; the last token has no target.
        targets = torch.tensor(token_ids[start + 1:start + 1 + hidden.shape[0]], device=hidden.device)
        if targets.numel() == 0:
            continue
        logits = model.compute_logits(hidden[: targets.numel()])  # [n, vocab] fp32
        total += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
    return total, count


def perplexity(
    model: nn.Module,
    token_ids: list[int],
    kv_cache_dtype: str = "auto",
    max_context: int | None = None,
    chunk_size: int = 512,
) -> float:
    """exp(mean NLL) of ``token_ids`` (at least 2 tokens). ``kv_cache_dtype="fp8"`` scores with an e4m3 KV cache
    (the attention layers' k_scale/v_scale apply); ``max_context`` defaults to the model's position limit."""
    token_ids = [int(t) for t in token_ids]
    if len(token_ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(token_ids)}; pass a longer text")
    if kv_cache_dtype not in ("auto", "fp8"):
        raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}")
    kv_dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else None
    if max_context is None:
        max_context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 4096)
    total, count = 0.0, 0
    for start in range(0, len(token_ids), max_context):
        window = token_ids[start:start + max_context]
        if len(window) < 2:
            break
        nll, n = negative_log_likelihood(model, window, chunk_size, kv_dtype)
        total, count = total + nll, count + n
    return math.exp(total / count)
