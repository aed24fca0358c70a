"""Linear layer: y = x W^T + b. The weight is [out_features, in_features], as in Hugging Face checkpoints.

Fused projections (qkv_proj = q|k|v, gate_up_proj = gate|up) are one Linear whose rows are the concatenated
parts; `output_sizes` records the parts so the loader can copy each checkpoint tensor into its row slice and the
FP8 builder can see the layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 output_sizes: list[int] | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.output_sizes = list(output_sizes) if output_sizes else [out_features]
        if sum(self.output_sizes) != out_features:
            raise ValueError(f"output_sizes {self.output_sizes} must sum to out_features={out_features}")
        # Uninitialized on purpose: the loader overwrites every element.
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in_features] -> [..., out_features]
        return F.linear(x, self.weight, self.bias)

    def shard_rows(self, shard: int) -> slice:
        """Rows of the fused weight that part `shard` (e.g. 0=q, 1=k, 2=v) occupies."""
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}"
