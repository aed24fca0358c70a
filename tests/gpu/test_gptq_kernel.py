"""The GPTQ block kernel (kernels/gptq_block.py) against the torch loop it replaces (build/gptq.py::_round_block),
and the whole GPTQ rounding on the GPU against the same rounding on the CPU."""
from __future__ import annotations

import pytest
import torch

from tests.gpu.kernel_checks import INTERPRET


def _factor(k: int, device) -> torch.Tensor:
    """An upper Cholesky factor of H^-1 for a random well-conditioned Hessian, as GPTQ builds it."""
    x = torch.randn(4 * k, k, device=device)
    hessian = x.t() @ x + 0.01 * k * torch.eye(k, device=device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)


@pytest.mark.parametrize("rows, n", [(64, 4096), (64, 6144), (37, 1000), (1, 64)] if not INTERPRET
                         else [(64, 96), (13, 40)])
def test_block_kernel_matches_torch_loop(device, rows, n):
    from optimum_nvidia_core.build.gptq import fp8_round_block as _round_block
    from optimum_nvidia_core.kernels.gptq_block import gptq_round_block

    block = 0.05 * torch.randn(rows, n, device=device)
    factor = _factor(rows, device)
    scale = block.abs().amax(dim=0) / 448.0 * 1.3  # per output channel
    codes, errors = gptq_round_block(block, factor, scale)
    ref_codes, ref_errors = _round_block(block, factor, scale)
    mismatch = (codes.float() != ref_codes.float()).float().mean().item()
    # Same operations in the same order (no FMA contraction): bit-exact on the GPU. Triton's interpreter casts some
    # fp32 values to the wrong e4m3 value (-124.6 -> -64 seen), and each wrong code feeds the rows after it, so
    # there only the layout is checked (a wrong index or stride differs almost everywhere).
    assert mismatch <= (0.35 if INTERPRET else 0.0), f"{mismatch:.3%} of the codes differ"
    if not INTERPRET:
        assert torch.equal(errors, ref_errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_on_gpu_is_as_good_as_on_cpu():
    from optimum_nvidia_core.build.gptq import gptq_quantize_weight
    from optimum_nvidia_core.layers.fp8_linear import quantize_weight

    weight = 0.05 * torch.randn(512, 320)
    x = torch.randn(2048, 320) @ (torch.eye(320) + 0.2 * torch.randn(320, 320))
    hessian = x.t() @ x

    def output_error(codes, scale):
        reference = x @ weight.t()
        return ((x @ (codes.cpu().float() * scale.cpu().reshape(-1, 1)).t() - reference).norm() / reference.norm())

    codes_gpu, scale_gpu = gptq_quantize_weight(weight.cuda(), hessian.cuda())
    codes_cpu, scale_cpu = gptq_quantize_weight(weight, hessian)
    # CUDA divides by a scalar as a multiply by its reciprocal: scales may differ in the last bit, no more.
    torch.testing.assert_close(scale_gpu.cpu(), scale_cpu, rtol=1e-6, atol=0)
    # Cholesky and the trailing matmuls sum in another order on the GPU, and one code that lands on the neighbouring
    # e4m3 value changes the errors pushed onto every later column: compare the rounding's quality, not its codes.
    gpu, cpu, nearest = output_error(codes_gpu, scale_gpu), output_error(codes_cpu, scale_cpu), \
        output_error(*quantize_weight(weight))
    assert gpu < 1.1 * cpu and gpu < 0.8 * nearest, (gpu, cpu, nearest)
