"""INT4 weight-only linear layer (W4A16): y = x W^T + b with W dequantized from 4-bit codes group by group.

Format (one layout for AWQ, GPTQ and our own builds; models/int4_formats.py converts the checkpoint layouts):
  qweight int32 [N, K/8]  eight codes per int32 along K: code k sits at bits 4*(k % 8) of qweight[n, k // 8]
  scales  [N, K/G]        compute dtype, one per group of G consecutive inputs of an output row
  zeros   uint8 [N, K/G]  the code that means 0.0, in 0..15 (8 for symmetric checkpoints)
  W[n, k] = (code[n, k] - zeros[n, k // G]) * scales[n, k // G], computed in fp32 and rounded to the compute dtype.
Rows are output channels as in layers.linear.Linear, so fused projections (qkv, gate|up) are row slices here too.
On the GPU the Triton kernel (kernels/int4_gemm.py) dequantizes tiles in registers with the same formula; the CPU
path dequantizes the whole matrix and calls F.linear, so the two differ only by summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_kernels
from .linear import Linear

PACK = 8  # codes per int32
MAX_CODE = 15


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 -> qweight int32 [N, K/8] (code k at bits 4*(k % 8))."""
    n, k = codes.shape
    if k % PACK:
        raise ValueError(f"INT4 packing needs in_features divisible by {PACK}, got {k}")
    grouped = codes.to(torch.int32).reshape(n, k // PACK, PACK)
    packed = torch.zeros(n, k // PACK, dtype=torch.int32, device=codes.device)
    for i in range(PACK):  # int32 shifts wrap at bit 31, which is what the sign bit of a packed word is
        packed |= grouped[:, :, i] << (4 * i)
    return packed


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [N, K/8] -> codes uint8 [N, K]."""
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int32, device=qweight.device)
    codes = (qweight.unsqueeze(-1) >> shifts) & MAX_CODE  # [N, K/8, 8]
    return codes.reshape(qweight.shape[0], -1).to(torch.uint8)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stored format -> W [N, K] in ``dtype`` (the reference the GPU kernel is tested against)."""
    codes = unpack_codes(qweight)
    group_size = codes.shape[1] // scales.shape[1]
    offsets = codes.to(torch.int32) - zeros.to(torch.int32).repeat_interleave(group_size, dim=1)
    return (offsets.float() * scales.float().repeat_interleave(group_size, dim=1)).to(dtype)


def group_size_for(in_features: int, group_size: int) -> int:
    """-1 (one group per row, GPTQ's convention) -> in_features; checks that groups tile the row."""
    size = in_features if group_size == -1 else group_size
    if size <= 0 or in_features % size or size % 32:
        raise ValueError(f"INT4 group size {group_size} does not fit in_features={in_features}: the group size "
                         "must be a multiple of 32 that divides in_features (or -1 for one group per row)")
    return size


class Int4Linear(nn.Module):
    """Drop-in for layers.linear.Linear with 4-bit weights. Empty on construction (filled by the loader or
    ``from_codes``). Tensors are Parameters (requires_grad=False) so the checkpoint loader fills them as weights."""

    shard_rows = Linear.shard_rows  # fused parts are row slices, as in Linear

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 128,
                 output_sizes: list[int] | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size_for(in_features, group_size)
        self.output_sizes = list(output_sizes) if output_sizes else [out_features]
        groups = in_features // self.group_size

        def empty(*shape, dtype=dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.qweight = empty(out_features, in_features // PACK, dtype=torch.int32)
        self.scales = empty(out_features, groups)
        self.zeros = empty(out_features, groups, dtype=torch.uint8)
        self.bias = empty(out_features) if bias else None

    @classmethod
    def like(cls, linear: nn.Module, group_size: int, dtype: torch.dtype, device) -> "Int4Linear":
        """An empty Int4Linear of ``linear``'s shape and parts (to load saved or converted weights into)."""
        out_features, in_features = linear.weight.shape
        return cls(in_features, out_features, getattr(linear, "bias", None) is not None, group_size,
                   getattr(linear, "output_sizes", None), dtype, device)

    @classmethod
    def from_codes(cls, linear: nn.Module, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor) -> "Int4Linear":
        """Wrap quantized weights of ``linear``: codes [N, K] in 0..15, scales and zeros [N, K/G]."""
        weight = linear.weight
        module = cls.like(linear, weight.shape[1] // scales.shape[1], weight.dtype, weight.device)
        module.qweight.copy_(pack_codes(codes))
        module.scales.copy_(scales)
        module.zeros.copy_(zeros)
        if module.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [N, K] in ``dtype`` (default: the scales' dtype, i.e. the compute dtype)."""
        return dequantize(self.qweight, self.scales, self.zeros, dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        kernels = cuda_kernels() if x.is_cuda else None
        if kernels is None:
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        shape = x.shape
        out = kernels.int4_gemm(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros, self.bias)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, group_size={self.group_size}, " \
               f"bias={self.bias is not None}"
