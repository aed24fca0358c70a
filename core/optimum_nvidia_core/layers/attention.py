"""Paged attention: store this step's K/V in the block cache, then attend over each sequence's cached context.

Shapes at the boundary (T = tokens in the flat batch, Hq/Hkv = query/KV heads, D = head_dim):
    q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq * D]
    k_cache/v_cache [num_blocks, block_size, Hkv, D]: the compute dtype, or float8_e4m3fn (stores x / scale)
The runner allocates the caches and sets them (and the FP8 scales) on every layer before the first step.

The CPU path below is the reference: plain torch, one SDPA call per sequence. On CUDA the Triton kernels of
optimum_nvidia_core.kernels compute the same function (store_kv_cache, paged_attention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_kernels
from ..attention_metadata import AttentionMetadata

FP8_MAX = 448.0


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # Set by the model runner (not registered: the cache is not part of the checkpoint).
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale = torch.ones(1, dtype=torch.float32, device="cpu")  # fp32 [1]; != 1 only for an FP8 cache
        self.v_scale = torch.ones(1, dtype=torch.float32, device="cpu")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("Attention.k_cache/v_cache are not set: allocate the paged KV cache (ModelRunner) "
                               "and assign it to every layer of model.attention_layers() before running the model")
        kernels = cuda_kernels() if q.is_cuda else None  # CUDA dispatch point
        if kernels is not None and _kernels_support(self.head_dim):
            k_scale, v_scale = self._scales_on(q.device)
            kernels.store_kv_cache(k, v, self.k_cache, self.v_cache, attn.slot_mapping, k_scale, v_scale)
            out = kernels.paged_attention(q, self.k_cache, self.v_cache, k_scale, v_scale, attn, self.scale,
                                          self.sliding_window)
            return out.reshape(q.shape[0], self.num_heads * self.head_dim)
        self._store_kv(k, v, attn.slot_mapping)
        return self._attend_reference(q, attn)

    # ---- reference path --------------------------------------------------------------------------------
    def _scales_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_scale.device != device:
            self.k_scale, self.v_scale = self.k_scale.to(device), self.v_scale.to(device)
        return self.k_scale, self.v_scale

    def _store_kv(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write k/v [T, Hkv, D] to the cache slots; slot -1 (padding of a CUDA-graph bucket) is skipped."""
        valid = slot_mapping >= 0
        if not bool(valid.all()):
            k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)  # [num_blocks * block_size, Hkv, D]
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat[slot_mapping] = self._to_cache(k, self.k_scale)
        v_flat[slot_mapping] = self._to_cache(v, self.v_scale)

    def _to_cache(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.k_cache.dtype == torch.float8_e4m3fn:  # same rounding as layers.fp8_linear.quantize_fp8
            return (x.float() / scale.to(x.device)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return x.to(self.k_cache.dtype)

    def _from_cache(self, x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == torch.float8_e4m3fn:
            return (x.float() * scale.to(x.device)).to(dtype)
        return x.to(dtype)

    def _attend_reference(self, q: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Each sequence's queries (its last q_len tokens) attend causally to its context_len cached tokens."""
        block_size = self.k_cache.shape[1]
        out = torch.empty(q.shape[0], self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        start = 0
        for i, (q_len, ctx_len) in enumerate(zip(attn.query_lens_host, attn.context_lens_host)):
            if q_len == 0:
                continue
            num_blocks = -(-ctx_len // block_size)
            blocks = attn.block_tables[i, :num_blocks].long()
            keys = self.k_cache[blocks].reshape(-1, self.num_kv_heads, self.head_dim)[:ctx_len]
            values = self.v_cache[blocks].reshape(-1, self.num_kv_heads, self.head_dim)[:ctx_len]
            keys = self._from_cache(keys, self.k_scale, q.dtype)
            values = self._from_cache(values, self.v_scale, q.dtype)
            mask = self._mask(q_len, ctx_len, q.device)
            out[start:start + q_len] = self._sdpa(q[start:start + q_len], keys, values, mask)
            start += q_len
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
        """q [q_len, Hq, D], keys/values [ctx_len, Hkv, D] -> [q_len, Hq, D].

        GQA without copying K/V: the `group` query heads that share a KV head are stacked along the query axis,
        so SDPA sees [Hkv, group * q_len, D] queries against [Hkv, ctx_len, D] keys (query head h uses KV head
        h // group, as transformers' repeat_kv).
        """
        q_len, group = q.shape[0], self.num_heads // self.num_kv_heads
        grouped = q.transpose(0, 1).reshape(self.num_kv_heads, group * q_len, self.head_dim)
        if mask is not None:
            mask = mask.repeat(group, 1)  # [group * q_len, ctx_len]
        out = F.scaled_dot_product_attention(grouped, keys.transpose(0, 1), values.transpose(0, 1),
                                             attn_mask=mask, scale=self.scale)
        return out.reshape(self.num_heads, q_len, self.head_dim).transpose(0, 1)

    def _mask(self, q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor | None:
        """Bool [q_len, ctx_len], True = attend. Query j sits at position ctx_len - q_len + j."""
        if q_len == 1 and (self.sliding_window is None or ctx_len <= self.sliding_window):
            return None  # a single last token sees the whole context
        query_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
        key_pos = torch.arange(ctx_len, device=device)[None, :]
        mask = key_pos <= query_pos
        if self.sliding_window is not None:  # as transformers: a query sees its last `sliding_window` tokens
            mask &= key_pos > query_pos - self.sliding_window
        return mask


def _kernels_support(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
