"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""
from __future__ import annotations

import torch
from torch import nn

from . import cuda_kernels
from .fp8_linear import Fp8Activation, FusedQuantization


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.fused_quantization: FusedQuantization | None = None  # GPU: emit the next FP8 linear's input

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [T, H] -> normed [T, H]; with `residual`: returns (norm(x + residual), x + residual).

        Numerics follow transformers: the normalization runs in fp32 and is cast back before the weight.
        """
        if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:  # CUDA dispatch point: one fused kernel
            kernels = cuda_kernels()
            if kernels is not None:
                return self._cuda_forward(kernels, x, residual)
        if residual is not None:
            x = x + residual
            residual = x
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(input_dtype)
        return out if residual is None else (out, residual)

    def _cuda_forward(self, kernels, x: torch.Tensor, residual: torch.Tensor | None):
        fused = self.fused_quantization
        if fused is None:
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        out = kernels.rms_norm(x, self.weight, self.eps, residual, quantize=True, input_scale=fused.input_scale)
        if residual is None:
            return Fp8Activation(*out, x.dtype)
        return Fp8Activation(*out[0], x.dtype), out[1]
