"""FP8 GEMM, fused residual + RMSNorm, SiLU*mul and rotary kernels against float64 torch references."""
from __future__ import annotations

import pytest
import torch

from tests.gpu.kernel_checks import DTYPE, INTERPRET, poison, rel_err

FP8 = torch.float8_e4m3fn


def fp8_reference(x, w_q, w_scale, input_scale, bias):
    """The numerics of layers.fp8_linear: quantize x (static or per-token scale), fp8 x fp8 exact, scale, bias."""
    if input_scale is None:
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
    else:
        x_scale = input_scale.reshape(1, 1)
    x_q = (x.float() / x_scale).clamp(-448, 448).to(FP8)
    out = (x_q.double() @ w_q.double().t()) * (x_scale.double() * w_scale.double().reshape(1, -1))
    return out if bias is None else out + bias.double()


SHAPES = [(12288, 4096), (4096, 11008), (1000, 272)] if not INTERPRET else [(96, 64), (40, 272)]


def make_fp8_case(device, m, n, k, dynamic):
    x = torch.randn(m, k, device=device, dtype=DTYPE) * (1 + 3 * torch.rand(m, 1, device=device))
    weight = torch.randn(n, k, device=device) * 0.05
    per_channel = n % 2 == 0
    w_scale = (weight.abs().amax(1) / 448) if per_channel else (weight.abs().amax() / 448).reshape(1)
    w_q = (weight / w_scale.reshape(-1, 1)).clamp(-448, 448).to(FP8)
    input_scale = None if dynamic else (x.abs().amax().float() / 448).reshape(1) * 1.1
    bias = torch.randn(n, device=device, dtype=DTYPE) if n != 4096 else None
    return x, w_q, w_scale.float(), input_scale, bias


def quantize_reference(x, input_scale):
    """layers.fp8_linear's activation quantization: (e4m3 [M, K], fp32 scale [M, 1])."""
    if input_scale is None:
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
    else:
        x_scale = input_scale.reshape(1, 1).expand(x.shape[0], 1)
    return (x.float() / x_scale).clamp(-448, 448).to(FP8), x_scale


@pytest.mark.parametrize("m,k", [(1, 4096), (5, 11008), (300, 272)] if not INTERPRET else [(3, 272)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_quantize_fp8_kernel(device, m, k, dynamic):
    """Same bytes as the CPU quantization (IEEE division, saturation, round to nearest even), every row written."""
    from optimum_nvidia_core.kernels import quantize_fp8

    x = torch.randn(m, k, device=device, dtype=DTYPE) * (1 + 3 * torch.rand(m, 1, device=device))
    x[0, 0] = 1e4  # saturates under the static scale
    input_scale = None if dynamic else (x[:, 1:].abs().amax().float() / 448).reshape(1)
    x_q, row_scale = quantize_fp8(x, input_scale)
    # The reference runs on the CPU, as the CPU path does: torch on CUDA divides by a scalar as a multiplication
    # by its reciprocal, which can differ from IEEE division in the last bit.
    ref_q, ref_scale = quantize_reference(x.cpu(), None if dynamic else input_scale.cpu())
    x_q, row_scale = x_q.cpu(), row_scale.cpu()
    assert torch.equal(row_scale, ref_scale.reshape(-1))
    mismatch = (x_q.float() != ref_q.float()).float().mean().item()
    assert mismatch <= (0.1 if INTERPRET else 0.0), f"{mismatch:.2%} of the e4m3 values differ"


def run_fp8_gemm(x, w_q, w_scale, input_scale, bias, config=None):
    """quantize_fp8 then fp8_gemm -> (out [M, N], the float64 product of exactly the inputs the GEMM saw): the
    quantization itself is checked byte for byte by test_quantize_fp8_kernel."""
    from optimum_nvidia_core.kernels import fp8_gemm, quantize_fp8

    x_q, row_scale = quantize_fp8(x, input_scale)
    out = poison(torch.empty(x.shape[0], w_q.shape[0], device=x.device, dtype=DTYPE))
    fp8_gemm(x_q, row_scale, w_q, w_scale, bias, out_dtype=DTYPE, config=config, out=out)
    exact = (x_q.double() @ w_q.double().t()) * (row_scale.double()[:, None] * w_scale.double().reshape(1, -1))
    return out, exact if bias is None else exact + bias.double()


@pytest.mark.parametrize("m", [1, 3, 16, 40, 200, 300] if not INTERPRET else [1, 17])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_fp8_gemm_kernel(device, m, n, k, dynamic):
    """The Triton kernel for small M (cuBLAS past SMALL_M_MAX), on several real shapes and both scale kinds."""
    from optimum_nvidia_core.kernels.fp8_gemm import SMALL_M_MAX, candidates

    x, w_q, w_scale, input_scale, bias = make_fp8_case(device, m, n, k, dynamic)
    config = None if m > SMALL_M_MAX else candidates(m)[1]  # the first Triton candidate
    out, exact = run_fp8_gemm(x, w_q, w_scale, input_scale, bias, config)
    assert rel_err(out, exact) < (1e-1 if INTERPRET else 4e-3)  # bf16 output rounding: ~1e-3
    # and against the CPU path's numerics as a whole (its scale division may differ by one ulp on CUDA)
    err = rel_err(out, fp8_reference(x, w_q, w_scale, input_scale, bias))
    assert err < (1e-1 if INTERPRET else 1e-2), f"relative error {err:.2e}"


def test_fp8_gemm_tuned_dispatch(device):
    """The default path: the first call times the candidates (in a CUDA graph) and keeps one; later calls reuse
    it, also inside a graph capture."""
    x, w_q, w_scale, input_scale, bias = make_fp8_case(device, 2, 512, 1024, False)
    for _ in range(2):
        assert rel_err(*run_fp8_gemm(x, w_q, w_scale, input_scale, bias)) < (1e-1 if INTERPRET else 4e-3)


@pytest.mark.parametrize("m", [1, 3, 40, 150] if not INTERPRET else [1, 5])
def test_fp8_gemm_every_candidate(device, m):
    """Every tile shape the first-call tuner may pick (and cuBLAS) computes the same function."""
    from optimum_nvidia_core.kernels.fp8_gemm import candidates

    n, k = (256, 2048) if not INTERPRET else (64, 512)
    x = torch.randn(m, k, device=device, dtype=DTYPE)
    w_q = (torch.randn(n, k, device=device) * 50).clamp(-448, 448).to(FP8)
    w_scale = torch.rand(n, device=device) + 0.01
    bias = torch.randn(n, device=device, dtype=DTYPE)
    configs = candidates(m)
    if INTERPRET:  # no cuBLAS in the interpreter
        configs = [c for c in configs if c.kind != "cublas"][::3]
    for config in configs:
        assert rel_err(*run_fp8_gemm(x, w_q, w_scale, None, bias, config)) < (1e-1 if INTERPRET else 4e-3), config


@pytest.mark.parametrize("rows,hidden", [(1, 4096), (37, 576), (300, 5120)] if not INTERPRET else [(3, 576)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel(device, rows, hidden, with_residual):
    from optimum_nvidia_core.kernels import rms_norm

    x = torch.randn(rows, hidden, device=device, dtype=DTYPE)
    residual = torch.randn_like(x) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(DTYPE)
    out = poison(torch.empty_like(x))
    res_out = poison(torch.empty_like(x)) if with_residual else None
    rms_norm(x, weight, 1e-5, residual, out=out, residual_out=res_out)
    summed = (x.double() + residual.double()) if with_residual else x.double()
    ref = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    assert rel_err(out, ref) < 1e-2
    if with_residual:
        assert rel_err(res_out, summed) < 4e-3


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quantized_output(device, dynamic, with_residual):
    """Quantizing inside the norm (for the FP8 linear after it) writes the bytes and scales of the norm followed
    by the separate quantize pass, and the same residual."""
    from optimum_nvidia_core.kernels import quantize_fp8, rms_norm

    rows, hidden = (37, 4096) if not INTERPRET else (3, 576)
    x = torch.randn(rows, hidden, device=device, dtype=DTYPE) * (1 + 3 * torch.rand(rows, 1, device=device))
    residual = torch.randn_like(x) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(DTYPE)
    input_scale = None if dynamic else torch.tensor([0.004], device=device)
    plain = rms_norm(x, weight, 1e-5, residual)
    fused = rms_norm(x, weight, 1e-5, residual, quantize=True, input_scale=input_scale)
    if with_residual:
        (plain, plain_residual), (fused, fused_residual) = plain, fused
        assert torch.equal(fused_residual, plain_residual)
    ref_q, ref_scale = quantize_fp8(plain, input_scale)
    assert torch.equal(fused[1], ref_scale)
    assert torch.equal(fused[0].view(torch.uint8), ref_q.view(torch.uint8))


def test_silu_and_mul_quantized_output(device):
    """Quantizing inside SiLU*mul with a static scale (for the FP8 down projection) matches SiLU*mul then the
    quantize pass, byte for byte."""
    from optimum_nvidia_core.kernels import quantize_fp8, silu_and_mul

    rows, inter = (19, 11008) if not INTERPRET else (3, 1536)
    x = torch.randn(rows, 2 * inter, device=device, dtype=DTYPE) * 3
    input_scale = torch.tensor([0.05], device=device)
    ref_q, ref_scale = quantize_fp8(silu_and_mul(x), input_scale)
    fused_q, fused_scale = silu_and_mul(x, input_scale=input_scale)
    assert torch.equal(fused_scale, ref_scale)
    assert torch.equal(fused_q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("rows,inter", [(1, 11008), (19, 1536), (256, 14336)] if not INTERPRET else [(3, 1536)])
def test_silu_and_mul_kernel(device, rows, inter):
    from optimum_nvidia_core.kernels import silu_and_mul

    x = torch.randn(rows, 2 * inter, device=device, dtype=DTYPE) * 3
    out = poison(torch.empty(rows, inter, device=device, dtype=DTYPE))
    silu_and_mul(x, out=out)
    gate, up = x.double().chunk(2, dim=-1)
    assert rel_err(out, torch.nn.functional.silu(gate) * up) < 1e-2


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rot_dim", [(32, 8, 128, 128), (9, 3, 64, 64), (4, 4, 64, 32)])
def test_rotary_kernel(device, num_heads, num_kv_heads, head_dim, rot_dim):
    from optimum_nvidia_core.kernels import apply_rotary

    tokens = 50
    positions = torch.randint(0, 8192, (tokens,), device=device)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device=device).float() / rot_dim))).contiguous()
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device, dtype=DTYPE)
    q = qkv[:, :num_heads * head_dim].view(tokens, num_heads, head_dim)  # strided views, as the model has them
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    q0, k0 = q.double().clone(), k.double().clone()
    apply_rotary(q, k, positions, inv_freq)
    angles = positions.double()[:, None] * inv_freq.double()[None, :]  # [T, R/2]

    def rotate(x):
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        half = rot_dim // 2
        x1, x2, rest = x[..., :half], x[..., half:rot_dim], x[..., rot_dim:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)

    assert rel_err(q, rotate(q0)) < 1e-2 and rel_err(k, rotate(k0)) < 1e-2
