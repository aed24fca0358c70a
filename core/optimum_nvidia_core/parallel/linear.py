"""Sharded linears, cut from a full (loaded) Linear or Fp8Linear.

Column-parallel: the rank keeps some output rows (for a fused projection, some rows of each part); it computes its
slice of the output and needs no communication. Row-parallel: the rank keeps some input columns; its partial
products are summed over the ranks by ONE all-reduce, then the bias is added once.

Each sharded class subclasses the layer it shards (Linear / Fp8Linear), so everything that recognizes those
(the FP8 input-quantization fusion of norms and SiLU*mul, ``extra_repr``) still does. FP8: the per-output-channel
weight scales are cut with their rows (column-parallel) or kept whole (row-parallel: the rows are all there); a
static input scale is the same on every rank. A dynamic per-token input scale of a row-parallel layer (down_proj
in the default recipe) is the absmax of the WHOLE row: each rank's row absmax, then an all-reduce (max) of those
[T] scales, so every rank quantizes exactly as tensor_parallel_size=1 does. (Each shard's own absmax would be a
different quantization: on tiny models it changed greedy tokens.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import layers
from ..e4m3 import absmax_scale, quantize_fp8
from ..layers.fp8_linear import Fp8Activation, Fp8Linear
from ..layers.linear import Linear


def _rows(tensor: torch.Tensor, parts: list[slice]) -> torch.Tensor:
    return torch.cat([tensor[part] for part in parts]).contiguous()


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _all_reduce(out: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(out, group=group)
    return out


class ColumnParallelLinear(Linear):
    """The rows `parts` of a full Linear ([out, in] -> [sum(part sizes), in]); output_sizes: one per part."""

    @classmethod
    def from_full(cls, full: Linear, parts: list[slice]) -> "ColumnParallelLinear":
        sizes = [part.stop - part.start for part in parts]
        with torch.device("meta"):
            module = cls(full.in_features, sum(sizes), bias=full.bias is not None, output_sizes=sizes)
        module.weight = _param(_rows(full.weight.detach(), parts))
        if full.bias is not None:
            module.bias = _param(_rows(full.bias.detach(), parts))
        return module


class RowParallelLinear(Linear):
    """The input columns `columns` of a full Linear; forward sums the ranks' partial outputs, then adds the bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group=None):
        super().__init__(in_features, out_features, bias)
        self.group = group

    @classmethod
    def from_full(cls, full: Linear, columns: slice, group=None) -> "RowParallelLinear":
        with torch.device("meta"):
            module = cls(columns.stop - columns.start, full.out_features, bias=full.bias is not None, group=group)
        module.weight = _param(full.weight.detach()[:, columns].contiguous())
        if full.bias is not None:
            module.bias = _param(full.bias.detach().clone())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in / N] (this rank's slice) -> [..., out], the same on every rank
        out = _all_reduce(F.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


def _empty_fp8_like(cls, full: Fp8Linear, in_features: int, out_features: int, **extra) -> Fp8Linear:
    return cls(in_features, out_features, bias=full.bias is not None, per_channel=full.per_channel,
               static_input_scale=full.input_scale is not None,
               bias_dtype=full.bias.dtype if full.bias is not None else torch.float32, device="meta", **extra)


def _copy_input_scale(module: Fp8Linear, full: Fp8Linear) -> None:
    if full.input_scale is not None:
        module.input_scale = full.input_scale.detach().clone()


class ColumnParallelFp8Linear(Fp8Linear):
    """The rows `parts` of a full Fp8Linear, with their per-output-channel weight scales."""

    @classmethod
    def from_full(cls, full: Fp8Linear, parts: list[slice]) -> "ColumnParallelFp8Linear":
        sizes = [part.stop - part.start for part in parts]
        module = _empty_fp8_like(cls, full, full.in_features, sum(sizes))
        module.output_sizes = sizes
        module.weight = _rows(full.weight.detach(), parts)
        scale = full.weight_scale.detach()
        module.weight_scale = _rows(scale, parts) if full.per_channel else scale.clone()
        _copy_input_scale(module, full)
        if full.bias is not None:
            module.bias = _rows(full.bias.detach(), parts)
        return module


class RowParallelFp8Linear(Fp8Linear):
    """The input columns `columns` of a full Fp8Linear; the GEMM runs without bias, the bias is added once after
    the all-reduce."""

    def __init__(self, *args, group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.reduced_bias: torch.Tensor | None = None

    @classmethod
    def from_full(cls, full: Fp8Linear, columns: slice, group=None) -> "RowParallelFp8Linear":
        module = _empty_fp8_like(cls, full, columns.stop - columns.start, full.out_features, group=group)
        module.weight = full.weight.detach()[:, columns].contiguous()
        module.weight_scale = full.weight_scale.detach().clone()  # every output row is here: scales whole
        _copy_input_scale(module, full)
        module.bias = None
        if full.bias is not None:
            module.reduced_bias = full.bias.detach().clone()
        return module

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        # x [..., in / N] (this rank's slice) -> [..., out], the same on every rank
        dynamic = self.input_scale is None and not isinstance(x, Fp8Activation)
        out = self._dynamic_forward(x) if dynamic else super().forward(x)
        out = _all_reduce(out, self.group)
        return out if self.reduced_bias is None else out + self.reduced_bias.to(out.dtype)

    def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token scales of the whole row (max over the ranks), then this rank's partial GEMM."""
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)  # [T, in / N]
        scale = absmax_scale(x2d, dim=1)  # [T, 1]
        dist.all_reduce(scale, op=dist.ReduceOp.MAX, group=self.group)
        x_q = quantize_fp8(x2d, scale)
        kernels = layers.cuda_kernels() if x.is_cuda else None
        if kernels is not None:
            out = kernels.fp8_gemm(x_q, scale.reshape(-1), self.weight, self.weight_scale, None, out_dtype=x.dtype)
        else:
            out = self._reference_forward(x_q, scale, x.dtype)
        return out.reshape(*shape[:-1], self.out_features)


def column_parallel(full: nn.Module, parts: list[slice]) -> nn.Module:
    """A column-parallel shard of a Linear or Fp8Linear."""
    if isinstance(full, Fp8Linear):
        return ColumnParallelFp8Linear.from_full(full, parts)
    if type(full) is Linear:
        return ColumnParallelLinear.from_full(full, parts)
    raise _unsupported(full)


def row_parallel(full: nn.Module, columns: slice, group=None) -> nn.Module:
    """A row-parallel shard of a Linear or Fp8Linear, all-reducing over `group` (None: the default group)."""
    if isinstance(full, Fp8Linear):
        return RowParallelFp8Linear.from_full(full, columns, group)
    if type(full) is Linear:
        return RowParallelLinear.from_full(full, columns, group)
    raise _unsupported(full)


def _unsupported(module: nn.Module) -> NotImplementedError:
    return NotImplementedError(
        f"tensor parallelism does not shard {type(module).__name__} layers yet (bf16/fp16/fp32 and FP8 weights "
        "only); use tensor_parallel_size=1 for this model, or its bf16 checkpoint")
