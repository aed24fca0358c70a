"""Paged attention over the KV cache: the cache write, a split-K decode kernel and a varlen prefill kernel.

Cache layout (per layer, K and V alike): [num_blocks, block_size, num_kv_heads, head_dim], contiguous, in the
compute dtype or float8_e4m3fn. An FP8 cache stores x / scale; the kernels multiply the scale back on the fp32
scores (K) and on the fp32 output (V), so the bf16 and FP8 caches share one code path (`_load_kv_tile`; an FP8
cache is computed on in fp16, see `_compute_dtype`).

Decode (every sequence has one query token) is memory-bound: one program per (sequence, KV head, partition of
128-512 context tokens, see DECODE_PARTITION) reads that slice of K and V once for all query heads of the group (GQA), and a
second kernel merges the partitions' softmax statistics (flash-decoding). Prefill chunks and mixed batches go
through a flash-attention kernel whose queries attend causally to their whole cached context, so chunked prefill
and prefix-cache hits need nothing special.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimum_nvidia_core import e4m3
from optimum_nvidia_core.attention_metadata import AttentionMetadata

LOG2E = 1.4426950408889634
# Context tokens per decode program (benchmarks/NOTES.md, "Measurements behind the code": smaller partitions were
# not faster where measured), one size for every batch until a sweep says otherwise.
DECODE_PARTITION = 512
FP8_MAX = tl.constexpr(e4m3.FP8_MAX)  # constexpr so kernels may read it


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, IS_FP8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding row of a CUDA-graph bucket: nothing to store
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < NUM_KV_HEADS
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    if IS_FP8:  # same rounding as layers.fp8_linear.quantize_fp8: divide, saturate, round to nearest even
        k = tl.clamp(tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)), -FP8_MAX, FP8_MAX)
        v = tl.clamp(tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)), -FP8_MAX, FP8_MAX)
    cache_offset = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
    tl.store(k_cache_ptr + cache_offset, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offset, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> cache slots slot_mapping [T] (slot -1 is skipped). Scales: fp32 [1] tensors."""
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_head_dim(head_dim)
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        IS_FP8=k_cache.dtype == torch.float8_e4m3fn,
    )


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, tokens, valid, kv_head, dims, NUM_KV_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr):
    """K and V [len(tokens), HEAD_DIM] of one KV head, gathered through the block table, in the compute dtype."""
    block = tl.load(table_ptr + tokens // BLOCK_SIZE, mask=valid, other=0)
    slots = block.to(tl.int64) * BLOCK_SIZE + tokens % BLOCK_SIZE
    offsets = slots[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + dims[None, :]
    k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(COMPUTE)
    v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(COMPUTE)
    return k, v


@triton.jit(do_not_specialize=["stride_bt"])  # the block-table width changes every step: no recompiles
def _decode_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, context_lens_ptr,
    qk_scale, sliding_window, stride_qs, stride_qh, stride_os, stride_oh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr, NUM_PARTITIONS: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    lo = part * PARTITION
    if sliding_window > 0:
        lo = tl.maximum(lo, ctx - sliding_window)
    hi = tl.minimum(part * PARTITION + PARTITION, ctx)

    rows = tl.arange(0, GROUP_PAD)  # the query heads that share this KV head
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                mask=rows[:, None] < GROUP, other=0.0).to(COMPUTE)  # [GROUP_PAD, D]
    scale = qk_scale * tl.load(k_scale_ptr)  # softmax scale * K scale * log2(e): scores in the exp2 domain
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        valid = tokens < hi
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, tokens, valid, kv_head,
                             dims, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, COMPUTE)  # [BLOCK_N, D] each
        s = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v)
        m_i = m_new
    acc = acc * tl.load(v_scale_ptr)
    row_mask = rows[:, None] < GROUP
    if NUM_PARTITIONS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context (padding row) gives zeros
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # Partials laid out [S, Hq, NUM_PARTITIONS] (+ [D] for acc), contiguous.
        stat = (seq * NUM_KV_HEADS * GROUP + heads) * NUM_PARTITIONS + part
        tl.store(part_max_ptr + stat, m_i, mask=rows < GROUP)
        tl.store(part_sum_ptr + stat, l_i, mask=rows < GROUP)
        tl.store(part_acc_ptr + stat[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, context_lens_ptr, stride_os, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PARTITION: tl.constexpr,
    NUM_PARTITIONS: tl.constexpr, PARTS_PAD: tl.constexpr,
):
    seq, head = tl.program_id(0), tl.program_id(1)
    ctx = tl.load(context_lens_ptr + seq)
    parts = tl.arange(0, PARTS_PAD)
    used = (parts < NUM_PARTITIONS) & (parts * PARTITION < ctx)  # partitions past the context wrote stale data
    stat = (seq * NUM_HEADS + head) * NUM_PARTITIONS + parts
    m = tl.load(part_max_ptr + stat, mask=used, other=float("-inf"))
    m = tl.where(m == m, m, float("-inf"))
    m_all = tl.max(m, 0)
    weight = tl.where(used & (m > float("-inf")), tl.exp2(m - m_all), 0.0)  # [PARTS_PAD]
    l = tl.load(part_sum_ptr + stat, mask=used, other=0.0)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + stat[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
    total = tl.sum(weight * l, 0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    qk_scale, sliding_window, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
):
    seq, m_block, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    kv_head = head // GROUP
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index inside this sequence's chunk
    row_valid = rows < q_len
    q_pos = ctx - q_len + rows  # absolute position of each query token
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_valid[:, None], other=0.0).to(COMPUTE)  # [BLOCK_M, D]
    scale = qk_scale * tl.load(k_scale_ptr)
    hi = ctx - q_len + tl.minimum(m_block * BLOCK_M + BLOCK_M, q_len)  # keys past the last query are masked
    lo = ctx * 0
    if sliding_window > 0:
        lo = tl.maximum(ctx - q_len + m_block * BLOCK_M - sliding_window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        valid = tokens < hi
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, tokens, valid, kv_head,
                             dims, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, COMPUTE)
        s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_M, BLOCK_N]
        allowed = valid[None, :] & (tokens[None, :] <= q_pos[:, None])
        if sliding_window > 0:
            allowed = allowed & (tokens[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with nothing allowed yet stays at zero
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v)
        m_i = m_new
    out = acc * tl.load(v_scale_ptr) / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                    v_scale: torch.Tensor, attn: AttentionMetadata, softmax_scale: float,
                    sliding_window: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] attends to its sequence's cached context (this step's K/V already stored) -> [T, Hq, D].

    Decode-only batches take the split-K kernel, sized by attn.max_context_len (a CUDA graph captures with the
    largest context it will replay). Everything else takes the prefill kernel, sized by attn.max_query_len.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    block_size = k_cache.shape[1]
    _check_head_dim(head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    qk_scale = softmax_scale * LOG2E
    window = sliding_window or 0
    block_tables = attn.block_tables
    compute = _compute_dtype(q.dtype, k_cache.dtype)
    if attn.is_decode_only:
        num_seqs = num_tokens
        partition = DECODE_PARTITION
        num_parts = max(1, triton.cdiv(attn.max_context_len, partition))
        part_acc = part_max = part_sum = out  # unused placeholders when one partition suffices
        if num_parts > 1:
            part_max = torch.empty(num_seqs, num_heads, num_parts, dtype=torch.float32, device=q.device)
            part_sum = torch.empty_like(part_max)
            part_acc = torch.empty(num_seqs, num_heads, num_parts, head_dim, dtype=torch.float32, device=q.device)
        _decode_kernel[(num_seqs, num_kv_heads, num_parts)](
            out, part_acc, part_max, part_sum, q, k_cache, v_cache, k_scale, v_scale,
            block_tables, attn.context_lens, qk_scale, window,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=64, PARTITION=partition,
            NUM_PARTITIONS=num_parts, COMPUTE=compute, num_warps=4, num_stages=2,
        )
        if num_parts > 1:
            _decode_reduce_kernel[(num_seqs, num_heads)](
                out, part_acc, part_max, part_sum, attn.context_lens, out.stride(0), out.stride(1),
                NUM_HEADS=num_heads, HEAD_DIM=head_dim, PARTITION=partition,
                NUM_PARTITIONS=num_parts, PARTS_PAD=triton.next_power_of_2(num_parts), num_warps=4,
            )
        return out
    block_m, block_n, num_warps, num_stages = prefill_config(attn.max_query_len)
    grid = (attn.num_seqs, triton.cdiv(attn.max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        out, q, k_cache, v_cache, k_scale, v_scale, block_tables, attn.context_lens, attn.query_start_loc,
        qk_scale, window, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, COMPUTE=compute, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_config(max_query_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel for chunks of up to max_query_len: 64x64
    tiles with 4 warps, the fastest of a tile sweep (benchmarks/NOTES.md, "Measurements behind the code"). Bigger
    tiles do not pay: the K/V rows are gathered through the block table, so they only add registers."""
    if max_query_len <= 16:
        return 16, 64, 4, 2
    return 64, 64, 4, 2


def _compute_dtype(q_dtype: torch.dtype, kv_dtype: torch.dtype):
    """The dtype of the attention tiles. An e4m3 cache is read as fp16: e4m3 -> fp16 is one native conversion on
    Hopper (to bf16 it takes three), e4m3 and bf16 queries of normal magnitude (< 65504) are exact in fp16, and
    fp16 keeps more mantissa bits for the probabilities. Otherwise the query's dtype."""
    if kv_dtype == torch.float8_e4m3fn or q_dtype == torch.float16:
        return tl.float16
    return tl.bfloat16 if q_dtype == torch.bfloat16 else tl.float32


def _check_head_dim(head_dim: int) -> None:
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"the Triton attention kernels need a power-of-two head_dim >= 16, got {head_dim}; "
                         "run with enforce_eager on the torch reference path instead")
