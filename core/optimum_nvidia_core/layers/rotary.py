"""Rotary position embedding (the neox / Hugging Face "rotate half" layout), with Llama-3 and linear scaling.

cos/sin are computed from the positions on the fly (no table to size or to move), with the same fp32
arithmetic as transformers so results match it bit for bit in fp32.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import cuda_kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config) -> dict:
    """Rope settings from either spelling: transformers 5 `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    if not params.get("rope_type") and scaling:
        params.update(scaling)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    """fp32 [head_dim // 2] rotation speeds, scaled as the rope type asks."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}. "
                         "Use a checkpoint with one of these rope settings.")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (params["rope_theta"] ** exponents)
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, params)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, params: dict):
        super().__init__()
        self.head_dim = head_dim
        self.params = params
        inverse_frequencies(head_dim, params)  # fail at build time on an unsupported rope type
        self.inv_freq: torch.Tensor | None = None  # fp32 [D/2] on the compute device, made on first use

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T]; q [T, Hq, D], k [T, Hkv, D] -> rotated q, k (same shapes and dtype)
        if self.inv_freq is None or self.inv_freq.device != positions.device:
            self.inv_freq = inverse_frequencies(self.head_dim, self.params).to(positions.device)
        if q.is_cuda and q.dtype != torch.float32:  # CUDA dispatch point: in place, one launch for q and k
            kernels = cuda_kernels()
            if kernels is not None:
                kernels.apply_rotary(q, k, positions, self.inv_freq)
                return q, k
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin
