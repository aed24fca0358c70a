"""SiLU(gate) * up over the fused gate_up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_kernels


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up [T, 2 * I] (gate rows first, as the loader fuses them) -> [T, I]
        if gate_up.is_cuda and gate_up.dim() == 2 and gate_up.stride(1) == 1:  # CUDA dispatch point
            kernels = cuda_kernels()
            if kernels is not None:
                return kernels.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
