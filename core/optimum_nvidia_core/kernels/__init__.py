"""Triton kernels for the CUDA path.

Importing this package imports Triton, so call sites import it only when their tensors are on a CUDA device (and
catch ImportError to fall back to the plain-torch reference). Every kernel here has a torch reference test in
tests/gpu; each computes the same function as the CPU path of the layer that calls it.
"""
from optimum_nvidia_core.kernels.activation import silu_and_mul
from optimum_nvidia_core.kernels.fp8_gemm import fp8_gemm
from optimum_nvidia_core.kernels.fp8_quant import quantize_fp8
from optimum_nvidia_core.kernels.int4_gemm import int4_gemm
from optimum_nvidia_core.kernels.norm import rms_norm
from optimum_nvidia_core.kernels.paged_attention import paged_attention, store_kv_cache
from optimum_nvidia_core.kernels.rotary import apply_rotary

__all__ = ["apply_rotary", "fp8_gemm", "int4_gemm", "paged_attention", "quantize_fp8", "rms_norm", "silu_and_mul", "store_kv_cache"]
