"""Paged attention kernels (cache write, split-K decode, varlen prefill) against a float64 torch reference."""
from __future__ import annotations

import math

import pytest
import torch

from tests.gpu.kernel_checks import DTYPE, INTERPRET, poison, rel_err

FP8 = torch.float8_e4m3fn


def make_batch(query_lens, context_lens, num_kv_heads, head_dim, block_size, device):
    """Random block tables (shuffled physical blocks) and the AttentionMetadata of one step."""
    from optimum_nvidia_core.attention_metadata import AttentionMetadata

    blocks_per_seq = [math.ceil(c / block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that nobody owns
    perm = torch.randperm(num_blocks).tolist()
    tables, cursor = [], 0
    for n in blocks_per_seq:
        tables.append(perm[cursor:cursor + n])
        cursor += n
    _, meta = AttentionMetadata.build(tables, list(query_lens), list(context_lens), block_size, device)
    return meta, num_blocks


def reference(q, k_cache, v_cache, k_scale, v_scale, meta, scale, window):
    """Per sequence: gather its context, dequantize, causal (and windowed) softmax in float64."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    k_flat = k_cache.reshape(-1, num_kv_heads, head_dim).double() * k_scale
    v_flat = v_cache.reshape(-1, num_kv_heads, head_dim).double() * v_scale
    block_size = k_cache.shape[1]
    outs, start = [], 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens_host, meta.context_lens_host)):
        pos = torch.arange(ctx, device=q.device)
        slots = meta.block_tables[i].long()[pos // block_size] * block_size + pos % block_size
        k = k_flat[slots].repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = v_flat[slots].repeat_interleave(group, dim=1)
        qi = q[start:start + q_len].double()
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        allowed = pos[None, :] <= q_pos
        if window:
            allowed &= pos[None, :] > q_pos - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        start += q_len
    return torch.cat(outs)


def run_case(device, query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, kv_fp8,
             window=None, dtype=DTYPE):
    from optimum_nvidia_core.kernels import paged_attention, store_kv_cache

    meta, num_blocks = make_batch(query_lens, context_lens, num_kv_heads, head_dim, block_size, device)
    cache_dtype = FP8 if kv_fp8 else dtype
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # Earlier context: random values already in the cache (as if written by previous steps).
    k_cache = torch.randn(shape, device=device).to(cache_dtype)
    v_cache = torch.randn(shape, device=device).to(cache_dtype)
    scales = [0.5 + torch.rand(()).item(), 0.5 + torch.rand(()).item()] if kv_fp8 else [1.0, 1.0]
    k_scale = torch.tensor([scales[0]], device=device)
    v_scale = torch.tensor([scales[1]], device=device)
    total = sum(query_lens)
    q = torch.randn(total, num_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(total, num_kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(total, num_kv_heads, head_dim, device=device, dtype=dtype)

    store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
    slots = meta.slot_mapping
    stored_k = k_cache.reshape(-1, num_kv_heads, head_dim)[slots].float()
    expect_k = (k.float() / scales[0]).clamp(-448, 448).to(cache_dtype).float()
    assert (stored_k == expect_k).float().mean() > (0.9 if INTERPRET else 0.999)  # fp32 division rounding

    out = poison(torch.empty_like(q))
    scale = head_dim ** -0.5
    paged_attention(q, k_cache, v_cache, k_scale, v_scale, meta, scale, window, out=out)
    ref = reference(q, k_cache.float(), v_cache.float(), scales[0], scales[1], meta, scale, window)
    err = rel_err(out, ref)
    assert err < 2e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 32, 128), (32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("kv_fp8", [False, True])
def test_decode_kernel(device, num_heads, num_kv_heads, head_dim, kv_fp8):
    # Short and long contexts (several 512-token partitions), one that ends exactly on a block edge.
    contexts = [1, 17, 64, 700, 1333] if not INTERPRET else [1, 17, 600]
    run_case(device, [1] * len(contexts), contexts, num_heads, num_kv_heads, head_dim, 16, kv_fp8)


@pytest.mark.parametrize("block_size", [8, 32])
def test_decode_kernel_block_sizes_and_window(device, block_size):
    contexts = [5, 100, 1100] if not INTERPRET else [5, 100]
    run_case(device, [1] * len(contexts), contexts, 16, 4, 64, block_size, False)
    run_case(device, [1] * len(contexts), contexts, 16, 4, 64, block_size, False, window=40)


@pytest.mark.parametrize("kv_fp8", [False, True])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
def test_prefill_kernel_mixed_batch(device, kv_fp8, num_heads, num_kv_heads, head_dim):
    # A fresh prompt, a chunk after a cached prefix, a decode and a one-token prompt in one step.
    query_lens = [130, 70, 1, 1] if not INTERPRET else [40, 20, 1]
    context_lens = [130, 300, 57, 1] if not INTERPRET else [40, 50, 9]
    run_case(device, query_lens, context_lens, num_heads, num_kv_heads, head_dim, 16, kv_fp8)


def test_prefill_kernel_sliding_window(device):
    run_case(device, [90, 33], [90, 120], 8, 2, 64, 16, False, window=32)


def test_decode_padding_rows_are_zero(device):
    """CUDA-graph padding: context 0 and slot -1 must write zeros and touch no cache slot."""
    from optimum_nvidia_core.kernels import paged_attention, store_kv_cache

    meta, num_blocks = make_batch([1, 1], [20, 3], 2, 64, 16, device)
    meta.context_lens[1] = 0
    meta.slot_mapping[1] = -1
    k_cache = torch.randn(num_blocks, 16, 2, 64, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    before = k_cache.clone()
    one = torch.ones(1, device=device)
    k = torch.randn(2, 2, 64, device=device, dtype=DTYPE)
    store_kv_cache(k, k.clone(), k_cache, v_cache, meta.slot_mapping, one, one)
    changed = (k_cache != before).reshape(-1, 2, 64).any(-1).any(-1).nonzero().flatten().tolist()
    assert changed == [meta.slot_mapping[0].item()]
    q = torch.randn(2, 4, 64, device=device, dtype=DTYPE)
    out = poison(torch.empty_like(q))
    meta.max_context_len = 1024  # what a graph captures with: several partitions
    paged_attention(q, k_cache, v_cache, one, one, meta, 0.125, None, out=out)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
