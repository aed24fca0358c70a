"""Rotary position embedding applied in place to q and k in one launch (the "rotate half" layout).

The angles are computed in the kernel from the positions and the layer's fp32 inverse frequencies (no table),
as layers.rotary does: angle = position * inv_freq in fp32, cos/sin rounded to the compute dtype, and each
product and sum rounded as torch rounds them in that dtype. Dimensions past 2 * len(inv_freq) are left alone.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# libdevice's cos/sin are accurate for large angles (position * inv_freq reaches 1e5); Triton's CPU interpreter
# (tests) has no libdevice, so it gets tl.cos / tl.sin.
_LIBDEVICE = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _rotate(ptr, token, stride_t, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
            HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = ptr + token * stride_t + heads * stride_h + dims
    dtype = ptr.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    # out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; round like the torch reference does
    new1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    new2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(first, new1.to(dtype), mask=mask)
    tl.store(first + HALF, new2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, inv_freq_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, LIBDEVICE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    inv_freq = tl.load(inv_freq_ptr + dims, mask=dims < HALF, other=0.0)
    angle = tl.load(positions_ptr + token).to(tl.float32) * inv_freq
    dtype = q_ptr.dtype.element_ty
    if LIBDEVICE:
        cos, sin = libdevice.cos(angle), libdevice.sin(angle)
    else:
        cos, sin = tl.cos(angle), tl.sin(angle)
    cos = cos.to(dtype).to(tl.float32)[None, :]
    sin = sin.to(dtype).to(tl.float32)[None, :]
    _rotate(q_ptr, token, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HEADS_PAD, HALF, HALF_PAD)
    _rotate(k_ptr, token, stride_kt, stride_kh, cos, sin, NUM_K_HEADS, HEADS_PAD, HALF, HALF_PAD)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """In place: q [T, Hq, D], k [T, Hk, D] (views with unit stride along D), positions [T] int,
    inv_freq fp32 [R/2] contiguous, rotating the first R dims of each head."""
    if q.stride(2) != 1 or k.stride(2) != 1 or not inv_freq.is_contiguous():
        raise ValueError("apply_rotary wants q and k with unit stride along the head dim and a contiguous inv_freq")
    num_tokens, num_q_heads, _ = q.shape
    half = inv_freq.shape[0]
    _rotary_kernel[(num_tokens,)](
        q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1],
        HEADS_PAD=triton.next_power_of_2(max(num_q_heads, k.shape[1])),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), LIBDEVICE=_LIBDEVICE, num_warps=4,
    )
