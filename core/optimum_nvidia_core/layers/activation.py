"""SiLU(gate) * up over the fused gate_up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_kernels
from .fp8_linear import Fp8Activation, FusedQuantization


class SiluAndMul(nn.Module):
    def __init__(self):
        super().__init__()
        # GPU: emit the down projection's FP8 input (static scales only; see LlamaForCausalLM.fuse_fp8_...)
        self.fused_quantization: FusedQuantization | None = None

    def forward(self, gate_up: torch.Tensor):
        # gate_up [T, 2 * I] (gate rows first, as the loader fuses them) -> [T, I] (or its Fp8Activation)
        if gate_up.is_cuda and gate_up.dim() == 2 and gate_up.stride(1) == 1:  # CUDA dispatch point
            kernels = cuda_kernels()
            if kernels is not None:
                fused = self.fused_quantization
                if fused is None:
                    return kernels.silu_and_mul(gate_up)
                return Fp8Activation(*kernels.silu_and_mul(gate_up, input_scale=fused.input_scale), gate_up.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
