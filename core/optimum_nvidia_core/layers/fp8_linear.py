"""FP8 (e4m3) linear layer: y = (x_q * s_x) (W_q * s_w)^T + b.

W_q is float8_e4m3fn [out, in] with a per-output-channel scale s_w [out] (or per-tensor, [1]). The activation scale
s_x is either static per tensor ([1], from calibration) or dynamic per token ([T, 1], absmax of each row at run time).
Quantizing is e4m3.quantize_fp8 (``clamp(x / s, -448, 448)``, round-to-nearest-even), the same on CPU and GPU, so
the CPU path is a faithful emulation of the GPU one. Products of two e4m3 numbers are exact in fp32 and both paths
accumulate in fp32, so CPU and GPU results differ only by summation order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..e4m3 import FP8_DTYPE, FP8_MAX, MIN_SCALE, absmax_scale, quantize_fp8
from . import cuda_kernels


def quantize_weight(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (e4m3 weight [out, in], fp32 scale [out] per channel or [1] per tensor)."""
    scale = absmax_scale(weight, dim=1) if per_channel else absmax_scale(weight).reshape(1, 1)
    return quantize_fp8(weight, scale), scale.reshape(-1)


class Fp8Activation(NamedTuple):
    """An Fp8Linear's input already quantized by the GPU kernel that produced it (norm, SiLU*mul)."""

    data: torch.Tensor  # e4m3 [T, in]
    row_scale: torch.Tensor  # fp32 [T]
    dtype: torch.dtype  # the compute dtype: what the linear returns


@dataclass
class FusedQuantization:
    """Set on a norm / activation whose only consumer is an Fp8Linear (see `link_fused_quantization`): on the
    GPU its kernel then emits that linear's e4m3 input, one kernel per linear fewer."""

    input_scale: torch.Tensor | None  # the consumer's static scale [1], or None: dynamic per row


def link_fused_quantization(producer: nn.Module, consumer: nn.Module, width: int, dynamic: bool = True) -> None:
    """Let `producer` (RMSNorm, SiluAndMul) quantize for `consumer` when that is an Fp8Linear and a row of
    `width` values fits the fused kernels; with ``dynamic=False`` only for a static scale. Otherwise leave it
    unlinked (the linear quantizes its own input)."""
    from optimum_nvidia_core.kernels.fp8_quant import MAX_FUSED_WIDTH

    fused = isinstance(consumer, Fp8Linear) and width <= MAX_FUSED_WIDTH
    fused = fused and (dynamic or consumer.input_scale is not None)
    producer.fused_quantization = FusedQuantization(consumer.input_scale) if fused else None


class Fp8Linear(nn.Module):
    """Drop-in for layers.linear.Linear with e4m3 weights. Built by ``from_linear`` (quantize) or empty (load)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        per_channel: bool = True,
        static_input_scale: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.per_channel = per_channel
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        num_scales = out_features if per_channel else 1
        self.register_buffer("weight_scale", torch.ones(num_scales, dtype=torch.float32, device=device))
        # Static: one calibrated scale for every token. Dynamic (None): absmax of each token row at run time.
        self.input_scale: torch.Tensor | None
        if static_input_scale:
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Module, input_absmax: float | None, per_channel: bool = True,
                    quantized_weight: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Fp8Linear":
        """Quantize a high-precision linear. ``input_absmax`` from calibration gives a static activation scale;
        None gives dynamic per-token activation scales. ``quantized_weight`` (e4m3 weight, scale) replaces plain
        round-to-nearest (e.g. GPTQ-rounded weights)."""
        weight = linear.weight.detach()
        bias = getattr(linear, "bias", None)
        module = cls(
            weight.shape[1], weight.shape[0], bias is not None, per_channel=per_channel,
            static_input_scale=input_absmax is not None, bias_dtype=weight.dtype, device=weight.device,
        )
        module.weight, module.weight_scale = quantized_weight or quantize_weight(weight, per_channel)
        if input_absmax is not None:
            module.input_scale.fill_(max(float(input_absmax) / FP8_MAX, MIN_SCALE))
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    def extra_repr(self) -> str:
        weight = "per-channel" if self.per_channel else "per-tensor"
        activation = "static" if self.input_scale is not None else "dynamic"
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, " \
               f"weight_scale={weight}, activation_scale={activation}"

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        """x [..., in] (compute dtype) -> [..., out] in x's dtype; an Fp8Activation [T, in] -> [T, out]."""
        if isinstance(x, Fp8Activation):
            return cuda_kernels().fp8_gemm(x.data, x.row_scale, self.weight, self.weight_scale, self.bias,
                                           out_dtype=x.dtype)
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)  # [T, in]
        kernels = cuda_kernels() if x.is_cuda else None
        if kernels is not None:  # same numerics: x quantized once (e4m3 + fp32 scale per row), then the GEMM
            x_q, row_scale = kernels.quantize_fp8(x2d.contiguous(), self.input_scale)
            out = kernels.fp8_gemm(x_q, row_scale, self.weight, self.weight_scale, self.bias, out_dtype=x.dtype)
        else:
            x_q, x_scale = self.quantize_input(x2d)
            out = self._reference_forward(x_q, x_scale, x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, in] -> (e4m3 [T, in], fp32 scale [1, 1] static or [T, 1] dynamic)."""
        if self.input_scale is not None:
            scale = self.input_scale.reshape(1, 1)
        else:
            scale = absmax_scale(x2d, dim=1)
        return quantize_fp8(x2d, scale), scale

    def _reference_forward(self, x_q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        # e4m3 values upcast exactly to fp32; scales applied to the fp32 accumulator, as _scaled_mm does. On the
        # CPU this is about 2x faster than torch._scaled_mm (which gives the same values; see the unit tests).
        acc = x_q.float() @ self.weight.float().t()  # [T, out] fp32
        out = acc * (x_scale * self.weight_scale.reshape(1, -1))
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(out_dtype)
