"""FP8 (e4m3) linear for the GPU: y = (q(x) W_q^T) * s_x * s_w + b, the numerics of layers.fp8_linear.

Decode-sized products are memory-bound on the weights. Two Triton kernels cover them, both quantizing the
activation tile in registers (static scale, or the row's absmax for dynamic scales) and accumulating exact
e4m3 x e4m3 products in fp32:
  * a GEMV (M <= 4): each program streams [BLOCK_N, BLOCK_K] weight tiles in their natural K-contiguous layout
    (16-byte loads) and reduces on the CUDA cores;
  * a tensor-core kernel (M <= 64): tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] fp8 tiles.
Both can split K over SPLIT_K programs; the scaled partial sums then go to an fp32 buffer that a second small
kernel adds up (deterministic, no atomics). Which kernel and tile wins depends on the card and the shape, so the
first call of each (shape, M bucket) times the candidates and cuBLAS (torch._scaled_mm) and keeps the fastest
(`choose`). Large M (prefill) is compute-bound and always goes to cuBLAS.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
MIN_SCALE = tl.constexpr(1e-12)  # layers.fp8_linear.MIN_SCALE: an all-zero row must not divide by zero
SMALL_M_MAX = 64  # above this many rows, cuBLAS (_scaled_mm) is faster than the Triton kernels


class GemmConfig(NamedTuple):
    kind: str  # "gemv" | "dot" | "cublas"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _activation_scale(x_rows, row_ok, K, DYNAMIC: tl.constexpr, x_scale_ptr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """[BLOCK_M] fp32: the static scale, or absmax(row) / 448 (x is small and stays in L2)."""
    if DYNAMIC:
        ks = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & (k0 + ks < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
        return tl.maximum(tl.math.div_rn(amax, FP8_MAX), MIN_SCALE)
    return tl.zeros([BLOCK_M], tl.float32) + tl.load(x_scale_ptr)


@triton.jit
def _epilogue(acc, x_scale, rows, cols, row_ok, col_ok, out_ptr, w_scale_ptr, bias_ptr, stride_om, stride_split,
              pid_k, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    if PER_CHANNEL:
        w_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    else:
        w_scale = tl.zeros(cols.shape, tl.float32) + tl.load(w_scale_ptr)
    out = acc * (x_scale[:, None] * w_scale[None, :])
    offsets = rows[:, None] * stride_om + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # out_ptr is the fp32 partial buffer [SPLIT_K, M, N]
        tl.store(out_ptr + pid_k * stride_split + offsets, out, mask=mask)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, M, N, K, stride_xm, stride_om, stride_split,
    DYNAMIC: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    x_scale = _activation_scale(x_rows, row_ok, K, DYNAMIC, x_scale_ptr, BLOCK_M, BLOCK_K)
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * K  # W is [N, K] row-major: tiles [BLOCK_N, BLOCK_K], K-contiguous
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k0 + ks < k_hi
        w = tl.load(w_rows + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x_q = tl.clamp(tl.math.div_rn(x.to(tl.float32), x_scale[:, None]), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        if USE_DOT:  # tensor cores: [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
            acc += tl.dot(x_q, tl.trans(w))
        else:  # GEMV: broadcast multiply and reduce along K on the CUDA cores
            acc += tl.sum(w.to(tl.float32)[None, :, :] * x_q.to(tl.float32)[:, None, :], axis=2)
    _epilogue(acc, x_scale, rows, cols, row_ok, col_ok, out_ptr, w_scale_ptr, bias_ptr, stride_om, stride_split,
              pid_k, PER_CHANNEL, HAS_BIAS, SPLIT_K)


@triton.jit
def _split_k_reduce_kernel(partial_ptr, bias_ptr, out_ptr, M, N, stride_split, stride_om,
                           HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    total = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(SPLIT_K):
        total += tl.load(partial_ptr + split * stride_split + row * N + cols, mask=col_ok, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


def candidates(m: int) -> list[GemmConfig]:
    """Tile shapes worth timing for M rows (M <= SMALL_M_MAX)."""
    found = [GemmConfig("cublas")]
    if m <= 4:
        block_m = triton.next_power_of_2(m)
        for block_n, block_k, split_k in ((16, 512, 1), (32, 256, 1), (16, 512, 2), (32, 512, 2), (8, 1024, 1),
                                          (16, 1024, 4)):
            found.append(GemmConfig("gemv", block_m, block_n, block_k, split_k, 4, 3))
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    for block_n, block_k, split_k, stages in ((64, 256, 1, 3), (64, 256, 4, 3), (128, 128, 1, 4), (32, 256, 2, 4)):
        found.append(GemmConfig("dot", block_m, block_n, block_k if block_m < 64 else 128, split_k, 4, stages))
    return found


_CHOSEN: dict[tuple, GemmConfig] = {}


def choose(x, weight, weight_scale, input_scale, bias) -> GemmConfig:
    """The fastest candidate for this (shape, M bucket, options), timed once on the first call. Inside a CUDA
    graph capture nothing can be timed: an untimed shape then takes cuBLAS."""
    m = x.shape[0]
    bucket = triton.next_power_of_2(m)
    key = (bucket, *weight.shape, input_scale is None, weight_scale.numel() > 1, bias is not None, x.dtype,
           x.device)
    if key in _CHOSEN:
        return _CHOSEN[key]
    if torch.cuda.is_current_stream_capturing():
        return GemmConfig("cublas")
    timings = []
    for config in candidates(bucket):
        try:
            timings.append((_time(lambda: _launch(x, weight, weight_scale, input_scale, bias, config)), config))
        except Exception:  # noqa: BLE001 - e.g. a tile whose shared memory does not fit this card
            continue
    _CHOSEN[key] = min(timings)[1]
    return _CHOSEN[key]


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
             bias: torch.Tensor | None = None, config: GemmConfig | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16), weight e4m3 [N, K], weight_scale fp32 [N] or [1], input_scale fp32 [1] (static) or
    None (dynamic per token), bias [N] or None -> [M, N] in x's dtype (written into ``out`` when given)."""
    if x.dim() != 2 or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("fp8_gemm wants x [M, K] with unit stride along K and a contiguous weight [N, K]; "
                         "call .contiguous() on them first")
    cublas_ok = x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0 and x.is_cuda
    if config is None:
        if x.shape[0] > SMALL_M_MAX and cublas_ok:
            config = GemmConfig("cublas")
        elif x.is_cuda:
            config = choose(x, weight, weight_scale, input_scale, bias)
        else:  # Triton's CPU interpreter (tests)
            config = GemmConfig("gemv" if x.shape[0] <= 4 else "dot", triton.next_power_of_2(x.shape[0]) if
                                x.shape[0] <= 4 else 16, 32, 128, 2)
    if config.kind == "cublas" and not cublas_ok:
        config = GemmConfig("dot", 16 if x.shape[0] <= 16 else 64, 64, 128, 1)
    return _launch(x, weight, weight_scale, input_scale, bias, config, out)


def _launch(x, weight, weight_scale, input_scale, bias, config: GemmConfig, out=None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if config.kind == "cublas":
        result = _scaled_mm(x, weight, weight_scale, input_scale, bias)
        return result if out is None else out.copy_(result)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    target = out if config.split_k == 1 else torch.empty(config.split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m))
    scale_arg = input_scale if input_scale is not None else weight_scale  # unread when dynamic
    bias_arg = bias if bias is not None else weight_scale  # unread without bias
    _fp8_gemm_kernel[grid](
        x, weight, target, weight_scale, scale_arg, bias_arg, m, n, k, x.stride(0), n, m * n,
        DYNAMIC=input_scale is None, PER_CHANNEL=weight_scale.numel() > 1, HAS_BIAS=bias is not None,
        SPLIT_K=config.split_k, USE_DOT=config.kind == "dot", BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if config.split_k > 1:
        block = 256
        _split_k_reduce_kernel[(triton.cdiv(n, block), m)](
            target, bias_arg, out, m, n, m * n, n,
            HAS_BIAS=bias is not None, SPLIT_K=config.split_k, BLOCK=block, num_warps=4,
        )
    return out


def _scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """cuBLAS path, with the same quantization as layers.fp8_linear."""
    if input_scale is not None:
        x_scale = input_scale.reshape(1, 1)
    else:
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
    x_q = (x.float() / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    if x_scale.numel() == 1 and weight_scale.numel() == 1:
        out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale.reshape(()), scale_b=weight_scale.reshape(()),
                               out_dtype=x.dtype)
    else:  # row-wise scaling wants [M, 1] and [1, N] fp32 scales and a bf16 output
        scale_a = x_scale.expand(x.shape[0], 1).contiguous()
        scale_b = weight_scale.reshape(1, -1).expand(1, weight.shape[0]).contiguous()
        out = torch._scaled_mm(x_q, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        out = out.to(x.dtype)
    return out if bias is None else out + bias.to(out.dtype)
