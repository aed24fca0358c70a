"""GPTQ rounding to e4m3: same format and scales as round-to-nearest, smaller output error."""
import torch

from optimum_nvidia_core.build.gptq import gptq_quantize_weight
from optimum_nvidia_core.e4m3 import FP8_DTYPE
from optimum_nvidia_core.layers.fp8_linear import quantize_weight


def _output_error(x: torch.Tensor, weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> float:
    reference = x @ weight.t()
    dequantized = codes.float() * scale.reshape(-1, 1)
    return ((x @ dequantized.t() - reference).norm() / reference.norm()).item()


def _correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(k) + 0.2 * torch.randn(k, k, generator=generator)
    return torch.randn(tokens, k, generator=generator) @ mixing


def test_gptq_beats_nearest_rounding_on_held_out_inputs():
    torch.manual_seed(0)
    weight = 0.05 * torch.randn(96, 128)
    calibration, held_out = _correlated_inputs(1024, 128, seed=1), _correlated_inputs(512, 128, seed=1)[::2]
    codes, scale = gptq_quantize_weight(weight, calibration.t() @ calibration)
    nearest_codes, nearest_scale = quantize_weight(weight)
    assert codes.dtype == FP8_DTYPE and codes.shape == weight.shape
    assert torch.equal(scale, nearest_scale)  # same scales: the kernels and the file format do not change
    gptq_error = _output_error(held_out, weight, codes, scale)
    nearest_error = _output_error(held_out, weight, nearest_codes, nearest_scale)
    assert gptq_error < 0.8 * nearest_error, (gptq_error, nearest_error)


def test_gptq_per_tensor_and_dead_inputs():
    weight = 0.05 * torch.randn(32, 64)
    x = _correlated_inputs(256, 64, seed=2)
    x[:, 5] = 0.0  # an input channel that never fires: its Hessian row is zero
    codes, scale = gptq_quantize_weight(weight, x.t() @ x, per_channel=False)
    assert scale.shape == (1,) and torch.isfinite(codes.float()).all()
    assert _output_error(x, weight, codes, scale) < 0.05


def test_indefinite_hessian_falls_back_instead_of_crashing():
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    hessian = -torch.eye(32)  # no amount of damping makes this positive definite
    codes, scale = gptq_quantize_weight(weight, hessian)
    nearest, nearest_scale = quantize_weight(weight)
    assert torch.equal(scale.reshape(-1), nearest_scale.reshape(-1))
    assert torch.equal(codes.float(), nearest.float())  # identity factor: plain round-to-nearest
