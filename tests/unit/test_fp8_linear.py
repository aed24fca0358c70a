"""Fp8Linear against an fp32 reference, and the CPU emulation against torch._scaled_mm."""
import pytest
import torch
from torch import nn

from optimum_nvidia_core.e4m3 import FP8_DTYPE, FP8_MAX, quantize_fp8
from optimum_nvidia_core.layers.fp8_linear import Fp8Linear, quantize_weight


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _linear(in_features=256, out_features=192, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    # Uneven channel magnitudes: per-channel scales must beat per-tensor ones on this.
    linear.weight.data *= torch.logspace(-2, 0, out_features).unsqueeze(1)
    return linear


def test_quantize_rounds_to_nearest_e4m3_and_saturates():
    x = torch.tensor([0.0, 1.0, 1.0625, 1.1, 500.0, -1000.0])
    q = quantize_fp8(x, torch.tensor(1.0)).float()
    # 1.0625 is halfway between 1.0 and 1.125: ties go to even (1.0); out-of-range values saturate at +-448.
    assert q.tolist() == [0.0, 1.0, 1.0, 1.125, FP8_MAX, -FP8_MAX]


def test_weight_quantization_per_channel_maps_each_row_absmax_to_448():
    weight = torch.randn(8, 32) * torch.arange(1, 9).unsqueeze(1)
    w_q, scale = quantize_weight(weight, per_channel=True)
    assert w_q.dtype == FP8_DTYPE and scale.shape == (8,)
    assert torch.allclose(w_q.float().abs().amax(dim=1), torch.full((8,), FP8_MAX))
    dequantized = w_q.float() * scale.unsqueeze(1)
    assert _relative_error(dequantized, weight) < 0.04  # e4m3 keeps 3 mantissa bits: <= 6.25% per element


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("static", [True, False])
def test_fp8_linear_close_to_fp32_reference(per_channel, static):
    linear = _linear()
    x = torch.randn(37, 256)
    absmax = x.abs().max().item() if static else None
    fp8 = Fp8Linear.from_linear(linear, absmax, per_channel=per_channel)
    out, ref = fp8(x), linear(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    error = _relative_error(out, ref)
    assert error < 0.06, error
    assert fp8.weight.dtype == FP8_DTYPE
    assert (fp8.input_scale is not None) == static


def test_per_channel_beats_per_tensor_on_uneven_channels():
    linear = _linear(bias=False)
    x = torch.randn(64, 256)
    errors = {pc: _relative_error(Fp8Linear.from_linear(linear, None, per_channel=pc)(x), linear(x))
              for pc in (True, False)}
    assert errors[True] < errors[False]


def test_static_scale_saturates_outliers_dynamic_does_not():
    linear = _linear(bias=False)
    x = torch.randn(4, 256)
    x[0, 0] = 50.0  # an outlier beyond the calibrated range
    static = Fp8Linear.from_linear(linear, input_absmax=4.0)
    dynamic = Fp8Linear.from_linear(linear, input_absmax=None)
    ref = linear(x)
    assert _relative_error(dynamic(x)[0], ref[0]) < _relative_error(static(x)[0], ref[0])
    assert torch.isfinite(static(x)).all()


def test_cpu_emulation_matches_torch_scaled_mm():
    linear = _linear(bias=False)
    x = torch.randn(16, 256)
    for static in (True, False):
        fp8 = Fp8Linear.from_linear(linear, x.abs().max().item() if static else None)
        x_q, x_scale = fp8.quantize_input(x)
        scaled = torch._scaled_mm(
            x_q, fp8.weight.t(), scale_a=x_scale.expand(16, 1).contiguous(),
            scale_b=fp8.weight_scale.reshape(1, -1).contiguous(), out_dtype=torch.float32,
        )
        torch.testing.assert_close(fp8(x), scaled, rtol=1e-5, atol=1e-5)


def test_bf16_input_gives_bf16_output_and_3d_shapes():
    linear = _linear()
    fp8 = Fp8Linear.from_linear(linear.to(torch.bfloat16), input_absmax=3.0)
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    out = fp8(x)
    assert out.shape == (2, 5, 192) and out.dtype == torch.bfloat16
    assert _relative_error(out, linear(x)) < 0.06


def test_state_dict_round_trip_into_empty_module():
    fp8 = Fp8Linear.from_linear(_linear(), input_absmax=2.5)
    empty = Fp8Linear(256, 192, bias=True)
    empty.load_state_dict(fp8.state_dict())
    x = torch.randn(3, 256)
    assert torch.equal(empty(x), fp8(x))
    assert set(fp8.state_dict()) == {"weight", "weight_scale", "input_scale", "bias"}
    dynamic = Fp8Linear.from_linear(_linear(bias=False), input_absmax=None)
    assert set(dynamic.state_dict()) == {"weight", "weight_scale"}


def test_zero_input_gives_finite_output():
    fp8 = Fp8Linear.from_linear(_linear(), input_absmax=None)
    out = fp8(torch.zeros(3, 256))
    assert torch.isfinite(out).all()


def test_e4m3_constants_have_one_home():
    """448 (the e4m3 bound) and the smallest scale are written once, in e4m3.py; everything else imports them."""
    import ast
    from pathlib import Path

    import optimum_nvidia_core

    root = Path(optimum_nvidia_core.__file__).parent
    copies = [
        f"{path.relative_to(root)}:{node.lineno}"
        for path in sorted(root.rglob("*.py")) if path.name != "e4m3.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value in (448, 1e-12)
    ]
    assert copies == []
