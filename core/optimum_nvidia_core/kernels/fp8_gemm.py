"""FP8 (e4m3) linear for the GPU: y = (q(x) W_q^T) * s_x * s_w + b, the numerics of layers.fp8_linear.

Small M (decode) is memory-bound on the weights, and cuBLAS moves them at only 1.5-2.5 TB/s there (DESIGN.md), so
a Triton kernel takes it: each program owns BLOCK_N output channels and a 1/SPLIT_K slice of K, quantizes its
activation tile in registers (static scale, or the row's absmax for dynamic scales), and runs the tensor cores on
[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] fp8 tiles with fp32 accumulation. With SPLIT_K > 1 the scaled partial
sums go to an fp32 buffer that a second small kernel adds up (deterministic, no atomics). Large M (prefill) is
compute-bound and goes to torch._scaled_mm.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
MIN_SCALE = tl.constexpr(1e-12)  # layers.fp8_linear.MIN_SCALE: an all-zero row must not divide by zero
SMALL_M_MAX = 64  # above this many rows, cuBLAS (_scaled_mm) is faster than the Triton kernel


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4
    upcast: bool = False  # multiply in bf16 on exact upcasts of the e4m3 values instead of fp8 tensor-core ops


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, x_scale_ptr, bias_ptr,
    M, N, K, stride_xm, stride_om, stride_split,
    DYNAMIC: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    if DYNAMIC:  # per-token scale: absmax of the whole row (x is small and stays in L2)
        amax = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & (k0 + ks < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
        x_scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), MIN_SCALE)
    else:
        x_scale = tl.zeros([BLOCK_M], tl.float32) + tl.load(x_scale_ptr)

    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_cols = w_ptr + cols[None, :].to(tl.int64) * K  # W is [N, K] row-major: tile [BLOCK_K, BLOCK_N] is K-major
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k0 + ks < k_hi
        x = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x_q = tl.clamp(tl.math.div_rn(x.to(tl.float32), x_scale[:, None]), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        w = tl.load(w_cols + (k0 + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # e4m3 -> bf16 is exact, so this is the same product on bf16 tensor cores
            acc += tl.dot(x_q.to(tl.bfloat16), w.to(tl.bfloat16))
        else:
            acc += tl.dot(x_q, w)

    if PER_CHANNEL:
        w_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    else:
        w_scale = tl.zeros([BLOCK_N], tl.float32) + tl.load(w_scale_ptr)
    out = acc * (x_scale[:, None] * w_scale[None, :])
    out_offsets = rows[:, None] * stride_om + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # out_ptr is the fp32 partial buffer [SPLIT_K, M, N]
        tl.store(out_ptr + pid_k * stride_split + out_offsets, out, mask=mask)


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


_NUM_SMS: dict[int, int] = {}


def pick_config(m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """Tile shape for a decode-sized product: enough programs to fill every SM (split K when N is short)."""
    num_sms = _num_sms(device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n, block_k = 64, 256
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = 1
    while tiles * split_k < 2 * num_sms and k // (split_k * 2) >= 4 * block_k:
        split_k *= 2
    return GemmConfig(block_m, block_n, block_k, split_k)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's CPU interpreter (tests): pretend to be an H100
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
             bias: torch.Tensor | None = None, config: GemmConfig | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16), weight e4m3 [N, K], weight_scale fp32 [N] or [1], input_scale fp32 [1] (static) or
    None (dynamic per token), bias [N] or None -> [M, N] in x's dtype (written into ``out`` when given)."""
    if x.dim() != 2 or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("fp8_gemm wants x [M, K] with unit stride along K and a contiguous weight [N, K]; "
                         "call .contiguous() on them first")
    m, k = x.shape
    n = weight.shape[0]
    if m > SMALL_M_MAX and config is None and k % 16 == 0 and n % 16 == 0:
        result = _scaled_mm(x, weight, weight_scale, input_scale, bias)
        return result if out is None else out.copy_(result)
    config = config or pick_config(m, n, k, x.device)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    target = out if config.split_k == 1 else torch.empty(config.split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m))
    scale_arg = input_scale if input_scale is not None else weight_scale  # unread when dynamic
    bias_arg = bias if bias is not None else weight_scale  # unread without bias
    _fp8_gemm_kernel[grid](
        x, weight, target, weight_scale, scale_arg, bias_arg, m, n, k, x.stride(0), n, m * n,
        DYNAMIC=input_scale is None, PER_CHANNEL=weight_scale.numel() > 1, HAS_BIAS=bias is not None,
        SPLIT_K=config.split_k, UPCAST=config.upcast, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
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
    """cuBLAS path for large M, with the same quantization as layers.fp8_linear."""
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
