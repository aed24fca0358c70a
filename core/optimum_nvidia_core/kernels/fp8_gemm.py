"""FP8 (e4m3) GEMM for the GPU: y = (x_q W_q^T) * s_x[row] * s_w[col] + b, the numerics of layers.fp8_linear.

The input arrives quantized (kernels.fp8_quant: e4m3 [M, K] plus an fp32 scale per row). e4m3 x e4m3 products
are exact in fp32 and both paths accumulate in fp32, so results differ from the CPU reference only by summation
order.
  * M <= 256 (decode, short prefill chunks): memory-bound on the weights for small M. A Triton kernel streams
    [BLOCK_N, BLOCK_K] weight tiles in their natural K-contiguous layout through the tensor cores (tl.dot on a
    [BLOCK_M, BLOCK_K] x tile padded to at least 16 rows), optionally split along K into an fp32 buffer that a
    second kernel adds up (deterministic, no atomics); how it compares with cuBLAS FP8 is in benchmarks/NOTES.md.
    Which tile wins depends on the card and the shape, so the first call of each (shape, M bucket) times the
    candidates and cuBLAS inside a CUDA graph and keeps the fastest (`choose`).
  * M > 256 (prefill): compute-bound; cuBLAS `torch._scaled_mm` with row-wise scales.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

SMALL_M_MAX = 256  # above this many rows cuBLAS (_scaled_mm) is used untimed; up to it, the tuner decides


class GemmConfig(NamedTuple):
    kind: str  # "dot" | "cublas"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def split_k_range(K, pid_k, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [k_lo, k_hi) of K that split pid_k of SPLIT_K covers: whole BLOCK_K tiles (the last split may be short
    or empty)."""
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    return k_lo, tl.minimum(k_lo + k_per_split, K)


@triton.jit
def store_split_k_tile(acc, rows, cols, row_ok, col_ok, bias_ptr, out_ptr, stride_om, M, N, pid_k,
                       HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 -> out (+ bias) in out's dtype, or, split along K, -> the fp32 partial buffer
    [SPLIT_K, M, N] that finish_split_k sums (and adds the bias to)."""
    offsets = rows[:, None] * stride_om + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_k * M * N + offsets, acc, mask=mask)


@triton.jit(do_not_specialize=["M"])  # M changes every step: no recompile per divisibility of M
def _fp8_gemm_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)
    k_lo, k_hi = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + cols[:, None].to(tl.int64) * K  # W is [N, K] row-major: tiles [BLOCK_N, BLOCK_K]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k0 + ks < k_hi
        w = tl.load(w_rows + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] on the tensor cores. Hopper accumulates fp8 products in reduced
        # precision; promoting to the fp32 accumulator every 128 products (as cuBLAS does) keeps the GEMM within
        # bf16 rounding of the exact product (with Triton's default, never, it drifted to ~6e-3 relative).
        acc = tl.dot(x, tl.trans(w), acc, max_num_imprecise_acc=128)
    x_scale = tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)
    if PER_CHANNEL:
        w_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    else:
        w_scale = tl.zeros([BLOCK_N], tl.float32) + tl.load(w_scale_ptr)
    out = acc * (x_scale[:, None] * w_scale[None, :])
    store_split_k_tile(out, rows, cols, row_ok, col_ok, bias_ptr, out_ptr, stride_om, M, N, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _split_k_reduce_kernel(partial_ptr, bias_ptr, out_ptr, M, N, stride_om,
                           HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    total = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(SPLIT_K):
        total += tl.load(partial_ptr + split * M * N + row * N + cols, mask=col_ok, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


# (block_n, block_k, split_k, num_warps, num_stages). BLOCK_M 16 and 64: the winners of an H100 sweep over 88
# tiles each (benchmarks/NOTES.md), plus split-K variants for the shapes with few output columns. BLOCK_M 128
# (65-256 rows) was not swept: a few shared-memory-safe tiles, and the tuner also times cuBLAS for those rows.
_TILES = {
    16: ((32, 256, 1, 4, 4), (32, 256, 1, 4, 3), (64, 256, 1, 4, 3), (32, 512, 1, 4, 4), (128, 128, 1, 8, 4),
         (64, 128, 1, 4, 4), (128, 256, 1, 4, 3), (32, 256, 2, 4, 4), (64, 128, 4, 4, 4)),
    64: ((32, 256, 1, 4, 3), (32, 256, 1, 4, 4), (64, 256, 1, 8, 4), (64, 128, 1, 8, 3), (64, 256, 1, 4, 3),
         (128, 128, 1, 8, 3), (32, 256, 2, 4, 3), (64, 128, 2, 8, 3)),
    128: ((64, 128, 1, 8, 3), (128, 128, 1, 8, 3), (128, 128, 1, 8, 4), (64, 256, 1, 8, 3), (64, 128, 1, 4, 4)),
}


def m_bucket(m: int) -> int:
    """Rows are timed per bucket: 16 (M <= 16), then powers of two."""
    return max(16, triton.next_power_of_2(m))


def block_m_for(m: int) -> int:
    return min(m_bucket(m), 128)


def candidates(m: int) -> list[GemmConfig]:
    """cuBLAS and the Triton tiles worth timing for M rows (M <= SMALL_M_MAX)."""
    block_m = block_m_for(m)
    tiles = _TILES[16 if block_m == 16 else (64 if block_m <= 64 else 128)]
    return [GemmConfig("cublas")] + [GemmConfig("dot", block_m, *tile) for tile in tiles]


_CHOSEN: dict[tuple, GemmConfig] = {}


def choose(x_q, x_scale, weight, weight_scale, bias, out_dtype) -> GemmConfig:
    """The fastest candidate for this (shape, M bucket, options), timed once on the first call. Inside a CUDA
    graph capture nothing can be timed: an untimed shape then takes the first Triton tile."""
    key = (m_bucket(x_q.shape[0]), *weight.shape, weight_scale.numel() > 1, bias is not None, out_dtype, x_q.device)
    if key in _CHOSEN:
        return _CHOSEN[key]
    if torch.cuda.is_current_stream_capturing():
        return candidates(x_q.shape[0])[1]
    timings = []
    for config in candidates(x_q.shape[0]):
        if config.kind == "cublas" and not _cublas_ok(x_q, weight):
            continue
        try:
            timings.append((_graph_time(lambda c=config: _launch(x_q, x_scale, weight, weight_scale, bias,
                                                                 out_dtype, c)), config))
        except Exception:  # noqa: BLE001 - e.g. a tile whose shared memory does not fit this card
            continue
    _CHOSEN[key] = min(timings)[1]
    return _CHOSEN[key]


def _graph_time(fn, reps: int = 16) -> float:
    """ms per call, replayed from a CUDA graph: launched from Python, a kernel of a few microseconds would be
    timed at the host's launch rate instead."""
    fn()  # compiles; a failing tile raises here
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (3 * reps)


def _cublas_ok(x_q: torch.Tensor, weight: torch.Tensor) -> bool:
    return x_q.is_cuda and x_q.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0


def fp8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             config: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x_q e4m3 [M, K], x_scale fp32 [M] (kernels.quantize_fp8), weight e4m3 [N, K], weight_scale fp32 [N] or
    [1], bias [N] or None -> [M, N] in out_dtype (written into ``out`` when given)."""
    if x_q.dim() != 2 or x_q.stride(1) != 1 or not weight.is_contiguous() or x_scale.numel() != x_q.shape[0]:
        raise ValueError("fp8_gemm wants x_q [M, K] with unit stride along K, x_scale [M] and a contiguous "
                         "weight [N, K]; quantize x with kernels.quantize_fp8 first")
    if config is None:
        if x_q.shape[0] > SMALL_M_MAX and _cublas_ok(x_q, weight):
            config = GemmConfig("cublas")
        elif x_q.is_cuda:
            config = choose(x_q, x_scale, weight, weight_scale, bias, out_dtype)
        else:  # Triton's CPU interpreter (tests)
            config = GemmConfig("dot", block_m_for(x_q.shape[0]), 32, 128, 2)
    if config.kind == "cublas" and not _cublas_ok(x_q, weight):
        config = GemmConfig("dot", block_m_for(x_q.shape[0]), 64, 128, 1)
    return _launch(x_q, x_scale, weight, weight_scale, bias, out_dtype, config, out)


def _launch(x_q, x_scale, weight, weight_scale, bias, out_dtype, config: GemmConfig, out=None) -> torch.Tensor:
    m, k = x_q.shape
    n = weight.shape[0]
    if config.kind == "cublas":
        result = _scaled_mm(x_q, x_scale, weight, weight_scale, bias, out_dtype)
        return result if out is None else out.copy_(result)
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device) if out is None else out
    split = config.split_k
    target = split_k_target(out, split)
    grid = (triton.cdiv(n, config.block_n), split, triton.cdiv(m, config.block_m))
    bias_arg = bias if bias is not None else weight_scale  # unread without bias
    _fp8_gemm_kernel[grid](
        x_q, x_scale, weight, weight_scale, bias_arg, target, m, n, k, x_q.stride(0), out.stride(0),
        PER_CHANNEL=weight_scale.numel() > 1, HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return finish_split_k(target, bias_arg, out, bias is not None, split)


def split_k_target(out: torch.Tensor, split: int) -> torch.Tensor:
    """Where a GEMM of ``split`` K-slices writes: ``out`` itself, or fp32 partials [split, M, N] to be summed."""
    return out if split == 1 else torch.empty(split, *out.shape, dtype=torch.float32, device=out.device)


def finish_split_k(target: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, has_bias: bool,
                   split: int) -> torch.Tensor:
    """Sum the split-K partials (plus the bias, which the split kernels leave out) into ``out`` [M, N]."""
    if split > 1:
        m, n = out.shape
        block = 256
        _split_k_reduce_kernel[(triton.cdiv(n, block), m)](
            target, bias, out, m, n, out.stride(0), HAS_BIAS=has_bias, SPLIT_K=split, BLOCK=block, num_warps=4,
        )
    return out


def _scaled_mm(x_q, x_scale, weight, weight_scale, bias, out_dtype) -> torch.Tensor:
    """cuBLAS with row-wise scales: [M, 1] for the activations, [1, N] for the weights; bf16 out."""
    n = weight.shape[0]
    scale_b = weight_scale.reshape(1, -1) if weight_scale.numel() > 1 else weight_scale.reshape(1, 1).expand(1, n)
    out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale.reshape(-1, 1), scale_b=scale_b.contiguous(),
                           out_dtype=torch.bfloat16)
    out = out if out_dtype == torch.bfloat16 else out.to(out_dtype)
    return out if bias is None else out + bias.to(out_dtype)
