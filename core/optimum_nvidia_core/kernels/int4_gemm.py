"""W4A16 GEMM for the GPU: y = x W^T + b with W in the INT4 format of layers.int4_linear (same dequantization).

Each program streams packed [BLOCK_N, BLOCK_K / 8] int32 tiles of qweight (K-contiguous, like fp8_gemm's weight
tiles), unpacks them in registers with shifts, applies the tile's group scale and zero, rounds to the activation
dtype and multiplies:
  * BLOCK_M == 1 (decode of one sequence): a CUDA-core GEMV, fp32 products summed along K;
  * BLOCK_M >= 16: tl.dot on the tensor cores (x tile padded to 16 rows), fp32 accumulator;
optionally split along K into an fp32 buffer that fp8_gemm's reduce kernel adds up (deterministic, no atomics).
A BLOCK_K tile never straddles a group (BLOCK_K divides the group size), so scales and zeros load once per tile.
For large M there is one more candidate: dequantize W to a bf16 scratch once, then cuBLAS.
Which candidate wins depends on the card and the shape: the first call of each (shape, M bucket) times them inside
a CUDA graph and keeps the fastest, as fp8_gemm does (benchmarks/int4_bench.py prints the choices).
All launches are allocation-stable (outputs and split-K buffers sized by M only) and host-sync free after tuning.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from optimum_nvidia_core.kernels.fp8_gemm import _graph_time, finish_split_k, m_bucket, split_k_target


class Int4Config(NamedTuple):
    kind: str  # "gemv" | "dot" | "dequant" (dequantize once, then cuBLAS)
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    reshape: bool = True  # how _dequant_tile unpacks


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, cols, col_ok, k0, K, NUM_GROUPS, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr, RESHAPE: tl.constexpr):
    """W[cols, k0:k0+BLOCK_K] as [BLOCK_N, BLOCK_K] in OUT_DTYPE: (code - zero) * scale in fp32, then rounded.
    Two ways to unpack (the tuner times both): load each word once and split it into 8 with a reshape, or load
    each word once per code (8 lanes reading one address: one transaction) and shift, with no reshape."""
    rows = qw_ptr + cols[:, None].to(tl.int64) * (K // 8)
    if RESHAPE:
        packed = tl.load(rows + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :], mask=col_ok[:, None], other=0)
        shifts = tl.arange(0, 8) * 4
        codes = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # [BLOCK_N, BLOCK_K / 8, 8]
        codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))  # row-major: k = 8 * word + nibble, as packed
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        packed = tl.load(rows + (ks // 8)[None, :], mask=col_ok[:, None], other=0)  # [BLOCK_N, BLOCK_K]
        codes = (packed >> ((ks % 8) * 4)[None, :]) & 0xF
    group = cols.to(tl.int64) * NUM_GROUPS + k0 // GROUP
    scale = tl.load(s_ptr + group, mask=col_ok, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + group, mask=col_ok, other=0).to(tl.int32)
    return ((codes - zero[:, None]).to(tl.float32) * scale[:, None]).to(OUT_DTYPE)


@triton.jit(do_not_specialize=["M"])  # M changes every step: no recompile per divisibility of M
def _int4_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RESHAPE: tl.constexpr,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)
    num_groups = K // GROUP
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # whole tiles: K is a multiple of BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, cols, col_ok, k0, K, num_groups, GROUP, BLOCK_N, BLOCK_K,
                          x_ptr.dtype.element_ty, RESHAPE)
        x = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        if BLOCK_M == 1:
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    offsets = rows[:, None] * stride_om + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # out_ptr is the fp32 partial buffer [SPLIT_K, M, N]
        tl.store(out_ptr + pid_k * M * N + offsets, acc, mask=mask)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    col_ok = cols < N
    w = _dequant_tile(qw_ptr, s_ptr, z_ptr, cols, col_ok, k0, K, K // GROUP, GROUP, BLOCK_N, BLOCK_K,
                      out_ptr.dtype.element_ty, True)
    ks = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + cols[:, None].to(tl.int64) * K + ks[None, :], w, mask=col_ok[:, None])


# (block_n, block_k, split_k, num_warps, num_stages) per kind and M bucket. Not yet swept on a GPU: a spread of
# tile widths, depths and split-K for the decode shapes; the tuner times them all on the first call.
_GEMV_TILES = ((32, 128, 1, 4, 3), (64, 128, 1, 4, 3), (16, 128, 1, 2, 3), (32, 64, 1, 2, 4), (64, 64, 1, 4, 4),
               (128, 128, 1, 8, 3), (32, 128, 2, 4, 3), (64, 128, 4, 4, 3))
_DOT_TILES = {
    16: ((32, 128, 1, 4, 3), (64, 128, 1, 4, 3), (64, 64, 1, 4, 4), (128, 128, 1, 8, 3), (32, 128, 2, 4, 3),
         (64, 128, 4, 4, 3), (128, 64, 1, 4, 4)),
    64: ((64, 128, 1, 4, 3), (128, 128, 1, 8, 3), (64, 64, 1, 4, 4), (32, 128, 1, 4, 3), (64, 128, 2, 4, 3)),
    128: ((64, 128, 1, 8, 3), (128, 128, 1, 8, 3), (128, 64, 1, 8, 4), (64, 64, 1, 4, 4)),
}


def candidates(m: int, group_size: int) -> list[Int4Config]:
    """The launches worth timing for M rows."""
    bucket = m_bucket(m)
    configs = []
    if m == 1:
        configs += [Int4Config("gemv", 1, *tile) for tile in _GEMV_TILES]
        configs += [Int4Config("gemv", 1, *tile, reshape=False) for tile in _GEMV_TILES[:4]]
    block_m = min(bucket, 128)
    tiles = _DOT_TILES[16 if block_m == 16 else (64 if block_m <= 64 else 128)]
    configs += [Int4Config("dot", block_m, *tile) for tile in tiles]
    configs += [Int4Config("dot", block_m, *tile, reshape=False) for tile in tiles[:3]]
    if bucket >= 64:
        configs.append(Int4Config("dequant"))
    # A tile must not straddle a group: narrow BLOCK_K to divide the group (a multiple of 32; 64 on SmolLM2).
    configs = [c._replace(block_k=math.gcd(c.block_k, group_size)) for c in configs]
    return list(dict.fromkeys(configs))


_CHOSEN: dict[tuple, Int4Config] = {}
_FAILED: set[tuple] = set()  # (config, device, dtype, group) that failed to compile or launch: never tried again


def choose(x, qweight, scales, zeros, bias) -> Int4Config:
    """The fastest candidate for this (shape, M bucket), timed once. A candidate that fails to compile or launch
    (e.g. a tile whose shared memory exceeds this card's: the tile lists are shared by every card) is skipped and
    remembered. Inside a CUDA graph capture nothing can be timed: an untimed shape then takes the first candidate
    not known to fail (the engine runs each shape eagerly before capturing it, so this is a fallback)."""
    m, k = x.shape
    group = k // scales.shape[1]
    key = (1 if m == 1 else m_bucket(m), *qweight.shape, group, bias is not None, x.dtype, x.device)
    if key in _CHOSEN:
        return _CHOSEN[key]
    where = (x.device, x.dtype, group)
    options = [c for c in candidates(m, group) if (c, *where) not in _FAILED]
    if torch.cuda.is_current_stream_capturing():
        return options[0]
    timings, errors = [], []
    for config in options:
        try:
            timings.append((_graph_time(lambda c=config: _launch(x, qweight, scales, zeros, bias, c)), config))
        except Exception as error:  # noqa: BLE001 - any failure of one candidate: the others may run
            _FAILED.add((config, *where))
            errors.append(f"{config}: {type(error).__name__}: {str(error)[:200]}")
    if not timings:
        raise RuntimeError(f"no INT4 GEMM candidate runs for x {tuple(x.shape)} {x.dtype}, qweight "
                           f"{tuple(qweight.shape)}, group {group} on {x.device}: " + "; ".join(errors))
    _CHOSEN[key] = min(timings, key=lambda timing: timing[0])[1]
    return _CHOSEN[key]


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              bias: torch.Tensor | None = None, config: Int4Config | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16), qweight int32 [N, K/8], scales [N, K/G], zeros uint8 [N, K/G], bias [N] or None
    -> [M, N] in x's dtype."""
    if x.dim() != 2 or x.stride(1) != 1:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    if not (qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        raise ValueError("int4_gemm wants contiguous qweight [N, K/8], scales and zeros [N, K/G]")
    if qweight.shape[1] * 8 != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns, the INT4 weight {qweight.shape[1] * 8}")
    if config is None:
        if x.is_cuda:
            config = choose(x, qweight, scales, zeros, bias)
        else:  # Triton's CPU interpreter (tests)
            config = candidates(x.shape[0], x.shape[1] // scales.shape[1])[0]
    return _launch(x, qweight, scales, zeros, bias, config)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W [N, K] in ``dtype`` on the GPU (the same values as layers.int4_linear.dequantize)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    group = k // scales.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_k = 64 if group % 64 == 0 else 32
    _dequant_kernel[(triton.cdiv(n, 64), k // block_k)](qweight, scales, zeros, out, n, k, GROUP=group,
                                                       BLOCK_N=64, BLOCK_K=block_k, num_warps=4)
    return out


def _launch(x, qweight, scales, zeros, bias, config: Int4Config) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    if config.kind == "dequant":
        out = x @ dequantize_int4(qweight, scales, zeros, x.dtype).t()
        return out if bias is None else out + bias.to(x.dtype)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = config.split_k
    target = split_k_target(out, split)
    grid = (triton.cdiv(n, config.block_n), split, triton.cdiv(m, config.block_m))
    bias_arg = bias if bias is not None else scales  # unread without bias
    _int4_gemm_kernel[grid](
        x, qweight, scales, zeros, bias_arg, target, m, n, k, x.stride(0), out.stride(0),
        GROUP=k // scales.shape[1], HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, RESHAPE=config.reshape,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return finish_split_k(target, bias_arg, out, bias is not None, split)
