"""W4A16 GEMM for the GPU: y = x W^T + b with W in the INT4 format of layers.int4_linear (same dequantization).

Each program streams packed [BLOCK_N, BLOCK_K / 8] int32 tiles of qweight (K-contiguous, like fp8_gemm's weight
tiles) and never unpacks them into a [BLOCK_N, BLOCK_K] tile: nibble j of every word is taken as its own
[BLOCK_N, BLOCK_K / 8] slice and met by the x values at k = 8 * word + j (a strided read of x, which stays in L1).
Unpacking is the cost here, not the bytes (a decode GEMV must do its integer work for 8+ weights a nanosecond and
SM), so no nibble goes through an int -> float conversion (a quarter-rate instruction):
  * "gemv" (M == 1): one shift puts two nibbles at bits 12-15 and 16-19, and OR-ed with the bits of 1.0 each is
    already the fp32 1 + code / 2048 (or / 128): one LOP3 and one FFMA a weight; the affine part (sums of x, the
    zero) is taken out once a tile (_gemv_tile_folded). Products are accumulated per (column, word) in fp32 and
    summed across words once at the end.
  * "dot" (tensor cores; BLOCK_K >= 128, so each nibble slice is 16+ deep): the nibble OR-ed into the mantissa
    of 2^23 is the fp32 2^23 + code, exactly; minus 2^23 + zero it is code - zero, exact in the activation dtype;
    each slice goes through tl.dot with its x slice and the group's scale multiplies the tile's sum.
  * "dequant": dequantize W to a bf16 scratch once, then cuBLAS (large M; and M > 1 with groups under 128).
Optionally split along K into an fp32 buffer that fp8_gemm's reduce kernel adds up (deterministic, no atomics).
A BLOCK_K tile never straddles a group (BLOCK_K divides the group size), so scales and zeros load once per tile.
Numerics: the scale is applied to the fp32 sum of a group, where the CPU path rounds each dequantized weight to
the compute dtype first; they differ by that rounding, the summation order and (GEMV) ~1e-5 of the fp32 sums.
Which candidate wins depends on the card and the shape: the first call of each (shape, M bucket) times them inside
a CUDA graph and keeps the fastest (benchmarks/int4_candidates.py times them all with the weights read from HBM).
All launches are allocation-stable (outputs and split-K buffers sized by M only) and host-sync free after tuning.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from optimum_nvidia_core.kernels.fp8_gemm import (_graph_time, finish_split_k, m_bucket, split_k_range,
                                                   split_k_target, store_split_k_tile)

# The bits of fp32 2^23: an integer below 2^23 OR-ed into its mantissa makes the fp32 2^23 + that integer.
TWO_23 = tl.constexpr(0x4B000000)


class Int4Config(NamedTuple):
    kind: str  # "gemv" | "dot" | "dequant" (dequantize once, then cuBLAS)
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    tiles: int = 1  # gemv: BLOCK_K tiles a step (1, 2 or 4); K must be a multiple of their width


@triton.jit
def _offsets(packed, zero, J: tl.constexpr):
    """(code j of each word - zero) as exact fp32: packed [BLOCK_N, WORDS] int32, zero [BLOCK_N, 1] fp32."""
    bits = ((packed >> (4 * J)) & 0xF) | TWO_23
    return bits.to(tl.float32, bitcast=True) - (8388608.0 + zero)


@triton.jit
def _gemv_tile_folded(packed, x_ptr, k0, words, scale, zero):
    """sum_j x[k0 + 8w + j] * W[n, k0 + 8w + j] / scale up to a [BLOCK_N] term, per (column n, word w): returns
    (that [BLOCK_N, WORDS] times scale, the [BLOCK_N] term to subtract). One shift per two nibbles, no
    subtraction per weight: shifted so that nibbles 2i and 2i+1 sit at bits 12-15 and 16-19, each OR-ed with the
    bits of 1.0 is the fp32 1 + code / 2048 (1 + code / 128). With x of the first scaled by 16, every product is
    x' + x * code / 128: the affine part (sums of x, and the zero) comes out once per tile. Not exact: the
    products carry the large 1 * x' part, which costs 8 bits of the fp32 sum (still ~1e-5 relative on a group)."""
    part = tl.zeros(packed.shape, tl.float32)
    x_sum = tl.zeros(words.shape, tl.float32)  # sum of (16 x_lo + x_hi) per word
    x_raw = tl.zeros(words.shape, tl.float32)  # sum of x per word
    for i in tl.static_range(4):
        if i == 0:
            shifted = packed << 12
        elif i == 1:
            shifted = packed << 4
        elif i == 2:
            shifted = packed >> 4
        else:
            shifted = packed >> 12
        lo = ((shifted & 0xF000) | 0x3F800000).to(tl.float32, bitcast=True)
        hi = ((shifted & 0xF0000) | 0x3F800000).to(tl.float32, bitcast=True)
        x_lo = tl.load(x_ptr + k0 + 8 * words + 2 * i).to(tl.float32)
        x_hi = tl.load(x_ptr + k0 + 8 * words + 2 * i + 1).to(tl.float32)
        part += (16.0 * x_lo)[None, :] * lo  # two statements: two FFMAs (one sum would add a product pair)
        part += x_hi[None, :] * hi
        x_sum += 16.0 * x_lo + x_hi
        x_raw += x_lo + x_hi
    # sum x (code - zero) = 128 (part - x_sum) - zero * x_raw, summed over words
    correction = scale * (128.0 * tl.sum(x_sum, axis=0) + zero * tl.sum(x_raw, axis=0))
    return part * (128.0 * scale)[:, None], correction


@triton.jit
def _group_params(s_ptr, z_ptr, cols, col_ok, k0, NUM_GROUPS, GROUP: tl.constexpr):
    """The scale and zero of the group holding column k0, for each output column: fp32 [BLOCK_N] twice."""
    group = cols.to(tl.int64) * NUM_GROUPS + k0 // GROUP
    scale = tl.load(s_ptr + group, mask=col_ok, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + group, mask=col_ok, other=0).to(tl.float32)
    return scale, zero


@triton.jit
def _gemv_tile(packed, x_ptr, s_ptr, z_ptr, cols, col_ok, k0, K, words, acc, acc_1d, GROUP: tl.constexpr):
    scale, zero = _group_params(s_ptr, z_ptr, cols, col_ok, k0, K // GROUP, GROUP)
    part, correction = _gemv_tile_folded(packed, x_ptr, k0, words, scale, zero)
    return acc + part, acc_1d + correction


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, N, K, K_WORDS,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
):
    """x [1, K] -> out [1, N]. K_WORDS = K / 8, its own argument so that Triton sees its divisibility (16-byte
    loads). A step loads TILES adjacent BLOCK_K tiles (1, 2 or 4) before using them: a row is then read
    TILES * BLOCK_K / 2 bytes at a time (whole 128-byte lines from 2 on), with that many bytes in flight.
    (Loading the next step's tiles before using this step's measured 3-8% slower on the H200.)"""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    WORDS: tl.constexpr = BLOCK_K // 8
    words = tl.arange(0, WORDS)
    k_lo, k_hi = split_k_range(K, pid_k, SPLIT_K, BLOCK_K * TILES)
    w_rows = qw_ptr + cols[:, None].to(tl.int64) * K_WORDS + words[None, :]
    acc = tl.zeros([BLOCK_N, WORDS], tl.float32)
    acc_1d = tl.zeros([BLOCK_N], tl.float32)  # subtracted at the end
    for k0 in range(k_lo, k_hi, BLOCK_K * TILES):
        tile0 = tl.load(w_rows + tl.multiple_of(k0 // 8, WORDS), mask=col_ok[:, None], other=0)
        if TILES > 1:
            tile1 = tl.load(w_rows + tl.multiple_of((k0 + BLOCK_K) // 8, WORDS), mask=col_ok[:, None], other=0)
        if TILES > 2:
            tile2 = tl.load(w_rows + tl.multiple_of((k0 + 2 * BLOCK_K) // 8, WORDS), mask=col_ok[:, None], other=0)
            tile3 = tl.load(w_rows + tl.multiple_of((k0 + 3 * BLOCK_K) // 8, WORDS), mask=col_ok[:, None], other=0)
        acc, acc_1d = _gemv_tile(tile0, x_ptr, s_ptr, z_ptr, cols, col_ok, k0, K, words, acc, acc_1d, GROUP)
        if TILES > 1:
            acc, acc_1d = _gemv_tile(tile1, x_ptr, s_ptr, z_ptr, cols, col_ok, k0 + BLOCK_K, K, words, acc, acc_1d,
                                     GROUP)
        if TILES > 2:
            acc, acc_1d = _gemv_tile(tile2, x_ptr, s_ptr, z_ptr, cols, col_ok, k0 + 2 * BLOCK_K, K, words, acc,
                                     acc_1d, GROUP)
            acc, acc_1d = _gemv_tile(tile3, x_ptr, s_ptr, z_ptr, cols, col_ok, k0 + 3 * BLOCK_K, K, words, acc,
                                     acc_1d, GROUP)
    out = (tl.sum(acc, axis=1) - acc_1d)[None, :]
    store_split_k_tile(out, tl.arange(0, 1), cols, tl.arange(0, 1) < 1, col_ok, bias_ptr, out_ptr, N, 1, N, pid_k,
                       HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["M"])  # M changes every step: no recompile per divisibility of M
def _int4_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x [M, K] -> out [M, N] on the tensor cores."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    WORDS: tl.constexpr = BLOCK_K // 8
    words = tl.arange(0, WORDS)
    k_lo, k_hi = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    w_rows = qw_ptr + cols[:, None].to(tl.int64) * (K // 8)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        packed = tl.load(w_rows + (k0 // 8 + words)[None, :], mask=col_ok[:, None], other=0)
        scale, zero = _group_params(s_ptr, z_ptr, cols, col_ok, k0, K // GROUP, GROUP)
        part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for j in tl.static_range(8):
            x = tl.load(x_rows + (k0 + 8 * words + j)[None, :], mask=row_ok[:, None], other=0.0)
            w = _offsets(packed, zero[:, None], j).to(x_ptr.dtype.element_ty)  # -15..15: exact
            part = tl.dot(x, tl.trans(w), part)
        acc += part * scale[None, :]
    store_split_k_tile(acc, rows, cols, row_ok, col_ok, bias_ptr, out_ptr, stride_om, M, N, pid_k, HAS_BIAS,
                       SPLIT_K)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """W[cols, k0:k0 + BLOCK_K] = (code - zero) * scale in fp32, rounded to out's dtype (the CPU path's math)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    col_ok = cols < N
    packed = tl.load(qw_ptr + cols[:, None].to(tl.int64) * (K // 8) + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :],
                     mask=col_ok[:, None], other=0)
    codes = (packed[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # [BLOCK_N, BLOCK_K / 8, 8]
    codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))  # row-major: k = 8 * word + nibble, as packed
    scale, zero = _group_params(s_ptr, z_ptr, cols, col_ok, k0, K // GROUP, GROUP)
    w = ((codes.to(tl.float32) - zero[:, None]) * scale[:, None]).to(out_ptr.dtype.element_ty)
    ks = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + cols[:, None].to(tl.int64) * K + ks[None, :], w, mask=col_ok[:, None])


# GEMV (M == 1): (block_n, split_k, num_warps, tiles a step), BLOCK_K 128. Split-K 4..16 with 64..128 columns
# filled the H200 best for the 8B shapes (benchmarks/int4_candidates.py --sweep; results/ *-int4-candidates.json).
_GEMV_TILES = ((64, 8, 4, 1), (128, 8, 8, 1), (128, 4, 8, 1), (64, 16, 2, 1), (128, 16, 4, 1),
               (64, 4, 4, 2), (128, 4, 8, 2), (128, 2, 8, 2), (64, 8, 2, 2), (128, 8, 4, 2), (256, 4, 8, 2),
               (64, 2, 4, 4), (128, 2, 8, 4), (128, 1, 8, 4), (64, 4, 2, 4), (128, 4, 4, 4), (256, 2, 8, 4))
# Tensor cores: (block_n, block_k, split_k, num_warps, num_stages) per M bucket.
_DOT_TILES = {
    16: ((32, 128, 1, 4, 3), (64, 128, 1, 4, 3), (128, 128, 1, 8, 3), (32, 128, 2, 4, 3), (64, 128, 2, 4, 3),
         (64, 128, 4, 4, 3), (32, 128, 4, 4, 4)),
    64: ((64, 128, 1, 4, 3), (128, 128, 1, 8, 3), (32, 128, 1, 4, 3), (64, 128, 2, 4, 3)),
    128: ((64, 128, 1, 8, 3), (128, 128, 1, 8, 3), (128, 128, 1, 4, 4), (64, 128, 1, 4, 4)),
}
DOT_MIN_BLOCK_K = 128  # each nibble slice of a tile (BLOCK_K / 8 deep) must be 16 deep for tl.dot


def candidates(m: int, group_size: int, in_features: int) -> list[Int4Config]:
    """The launches worth timing for M rows. A tile must not straddle a group: BLOCK_K is narrowed to divide the
    group (a multiple of 32; 64 on SmolLM2), and below 128 the tensor-core kernel is out (cuBLAS on a
    dequantized W takes M > 1 then); a GEMV step of several tiles must divide in_features."""
    bucket = m_bucket(m)
    configs = []
    if m == 1:
        configs += [Int4Config("gemv", 1, n, 128, split, warps, 3, tiles) for n, split, warps, tiles in _GEMV_TILES]
    block_m = min(bucket, 128)
    tiles = _DOT_TILES[16 if block_m == 16 else (64 if block_m <= 64 else 128)]
    configs += [Int4Config("dot", block_m, *tile) for tile in tiles]
    configs = [c._replace(block_k=math.gcd(c.block_k, group_size)) for c in configs]
    configs = [c for c in configs if (c.kind != "dot" or c.block_k >= DOT_MIN_BLOCK_K)
               and in_features % (c.block_k * c.tiles) == 0]
    if bucket >= 64 or (m > 1 and not configs):
        configs.append(Int4Config("dequant"))
    return list(dict.fromkeys(configs))


_CHOSEN: dict[tuple, Int4Config] = {}
_FAILED: set[tuple] = set()  # (config, device, dtype, group) that failed to compile or launch: never tried again


def choose(x, qweight, scales, zeros, bias) -> Int4Config:
    """The fastest candidate for this (shape, M bucket), timed once. A candidate that fails to compile or launch
    (e.g. a tile whose shared memory exceeds this card's: the tile lists are shared by every card) is skipped and
    remembered. Inside a CUDA graph capture nothing can be timed: an untimed shape then takes the first candidate
    not known to fail (the engine runs each shape eagerly before capturing it, so this is a fallback). The
    weight is timed as it is: a small one (8B's o_proj is 8 MB) stays in L2 across the reps, where decode reads
    it from HBM (timing over copies that overflow L2 was tried, not measured to pay: benchmarks/NOTES.md)."""
    m, k = x.shape
    group = k // scales.shape[1]
    key = (1 if m == 1 else m_bucket(m), *qweight.shape, group, bias is not None, x.dtype, x.device)
    if key in _CHOSEN:
        return _CHOSEN[key]
    where = (x.device, x.dtype, group)
    options = [c for c in candidates(m, group, k) if (c, *where) not in _FAILED]
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
            config = candidates(x.shape[0], x.shape[1] // scales.shape[1], x.shape[1])[0]
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
    bias_arg = bias if bias is not None else scales  # unread without bias
    common = dict(GROUP=k // scales.shape[1], HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_N=config.block_n,
                  BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    if config.kind == "gemv":
        if m != 1:
            raise ValueError(f"the INT4 GEMV takes one row, got {m}")
        _int4_gemv_kernel[(triton.cdiv(n, config.block_n), split)](
            x, qweight, scales, zeros, bias_arg, target, n, k, k // 8, TILES=config.tiles, **common)
    else:
        grid = (triton.cdiv(n, config.block_n), split, triton.cdiv(m, config.block_m))
        _int4_gemm_kernel[grid](x, qweight, scales, zeros, bias_arg, target, m, n, k, x.stride(0), out.stride(0),
                                BLOCK_M=config.block_m, **common)
    return finish_split_k(target, bias_arg, out, bias is not None, split)
