"""W4A16 GEMM (kernels/int4_gemm.py) against the CPU path's dequantize-then-matmul, CUDA graphs against eager, and
INT4 engines on the GPU against the CPU."""
from __future__ import annotations

import pytest
import torch

from optimum_nvidia_core.layers.int4_linear import Int4Linear, dequantize, pack_codes
from tests.gpu.kernel_checks import DTYPE, INTERPRET, rel_err

# (N, K, group): Llama-3-8B's qkv / down / gate_up shapes, a ragged N, per-row groups, group 32, SmolLM2's qkv.
SHAPES = [(6144, 4096, 128), (4096, 14336, 128), (28672, 4096, 128), (1000, 256, -1), (544, 512, 32),
          (960, 576, 64)] if not INTERPRET else [(96, 256, 128), (40, 64, -1), (48, 192, 64)]
ROWS = [1, 3, 16, 33, 128, 300, 1024] if not INTERPRET else [1, 5, 70]


def int4_case(device, n, k, group, bias=False):
    group = k if group == -1 else group
    codes = torch.randint(0, 16, (n, k), device=device)
    scales = (0.002 + 0.02 * torch.rand(n, k // group, device=device)).to(DTYPE)
    zeros = torch.randint(0, 16, (n, k // group), device=device, dtype=torch.uint8)
    b = torch.randn(n, device=device, dtype=DTYPE) if bias else None
    return pack_codes(codes), scales, zeros, b


def reference(x, qweight, scales, zeros, bias):
    """The CPU path's numerics: W rounded to the activation dtype, then an exact (float64) matmul."""
    weight = dequantize(qweight, scales, zeros, x.dtype)
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_int4_gemm_matches_dequantize_then_matmul(device, m, n, k, group):
    from optimum_nvidia_core.kernels import int4_gemm

    qweight, scales, zeros, bias = int4_case(device, n, k, group, bias=n == 1000)
    x = torch.randn(m, k, device=device, dtype=DTYPE)
    out = int4_gemm(x, qweight, scales, zeros, bias)  # tuned: whichever candidate won
    assert out.shape == (m, n) and out.dtype == DTYPE
    assert rel_err(out, reference(x, qweight, scales, zeros, bias)) < 8e-3


@pytest.mark.parametrize("m", [1, 16, 300] if not INTERPRET else [1, 70])
def test_every_candidate_is_correct(device, m):
    """The tuner may pick any candidate on another card: each one must be right, split-K and dequant included."""
    from optimum_nvidia_core.kernels.int4_gemm import candidates, int4_gemm

    n, k, group = (1000, 1024, 128) if not INTERPRET else (96, 256, 128)
    qweight, scales, zeros, bias = int4_case(device, n, k, group, bias=True)
    x = torch.randn(m, k, device=device, dtype=DTYPE)
    ref = reference(x, qweight, scales, zeros, bias)
    ran = 0
    for config in candidates(m, group, k):
        try:
            out = int4_gemm(x, qweight, scales, zeros, bias, config=config)
        except Exception as exc:  # the tuner skips a tile this card cannot hold (its shared memory), so may we
            if "out of resource" not in str(exc).lower():
                raise
            continue
        assert rel_err(out, ref) < 8e-3, config
        ran += 1
    assert ran, "no candidate launches on this card"


def test_the_tuner_picks_a_candidate_that_runs_and_remembers_those_that_do_not():
    """On the card: every candidate that fails to launch (e.g. over the shared memory: 256 KiB asked, 227 KiB on
    the H200 for one M=300 tile) is one the tuner recorded and did not pick; the pick is right."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import importlib

    tuner = importlib.import_module("optimum_nvidia_core.kernels.int4_gemm")
    n, k, group = 1000, 1024, 128
    qweight, scales, zeros, bias = int4_case("cuda", n, k, group, bias=True)
    for m in (1, 16, 300):
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        chosen = tuner.choose(x, qweight, scales, zeros, bias)
        failed = {c for c, *_ in tuner._FAILED}
        assert chosen not in failed
        assert rel_err(tuner.int4_gemm(x, qweight, scales, zeros, bias, config=chosen),
                       reference(x, qweight, scales, zeros, bias)) < 8e-3
        for config in tuner.candidates(m, group, k):
            try:
                tuner.int4_gemm(x, qweight, scales, zeros, bias, config=config)
            except Exception:  # noqa: BLE001 - whatever the failure, the tuner must have seen it
                assert config in failed, config


def test_dequantize_kernel_is_exact(device):
    from optimum_nvidia_core.kernels.int4_gemm import dequantize_int4

    qweight, scales, zeros, _ = int4_case(device, 200, 512, 128)
    assert torch.equal(dequantize_int4(qweight, scales, zeros, DTYPE).cpu(),
                       dequantize(qweight.cpu(), scales.cpu(), zeros.cpu(), DTYPE))


def test_graph_replay_matches_eager():
    """Captured once (after the first eager call tuned the shape), replayed on new inputs: no host syncs or
    shape-dependent allocations inside."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from optimum_nvidia_core.kernels import int4_gemm

    qweight, scales, zeros, bias = int4_case("cuda", 4096, 4096, 128)
    for m in (1, 8, 64):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        int4_gemm(x, qweight, scales, zeros, bias)  # tunes
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = int4_gemm(x, qweight, scales, zeros, bias)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.testing.assert_close(out, int4_gemm(x, qweight, scales, zeros, bias), rtol=0, atol=0)


def test_int4_linear_on_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    linear = Int4Linear(512, 384, bias=True, group_size=128, dtype=torch.bfloat16)
    qweight, scales, zeros, bias = int4_case("cpu", 384, 512, 128, bias=True)
    for name, value in (("qweight", qweight), ("scales", scales.bfloat16()), ("zeros", zeros),
                        ("bias", bias.bfloat16())):
        getattr(linear, name).data.copy_(value)
    x = torch.randn(3, 7, 512, dtype=torch.bfloat16)
    cpu = linear(x)
    gpu = linear.cuda()(x.cuda())
    assert gpu.shape == (3, 7, 384) and rel_err(gpu.cpu(), cpu) < 1e-2


def test_awq_checkpoint_on_gpu_matches_its_dequantized_twin(tmp_path):
    """A real-layout AWQ checkpoint through the loader onto the GPU (bf16, the Triton GEMM) vs its dequantized
    twin on the CPU (fp32): perplexity of a text within 2%."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from int4_checkpoints import write_int4_checkpoint
    from optimum_nvidia_core.build import perplexity
    from optimum_nvidia_core.models.loader import load_model

    write_int4_checkpoint(tmp_path / "awq", tmp_path / "ref", "awq")
    gpu = load_model(tmp_path / "awq", torch.bfloat16, "cuda")
    cpu = load_model(tmp_path / "ref", torch.float32, "cpu")
    tokens = torch.randint(3, 500, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    assert abs(perplexity(gpu, tokens) / perplexity(cpu, tokens) - 1) < 0.02


def test_int4_engine_on_gpu_matches_cpu(tiny_llama_dir, tmp_path, monkeypatch):
    """One INT4 engine (built on the CPU, saved) served on the GPU (CUDA graphs, Triton GEMMs) and on the CPU,
    both bf16: perplexity within 2% and the first greedy tokens equal."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from optimum_nvidia_core import LLM, SamplingParams

    monkeypatch.setenv("OPTIMUM_NVIDIA_CACHE", str(tmp_path / "cache"))
    built = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", quantization="int4", int4_method="awq",
                calibration_samples=8, max_batch_size=8)
    engine_dir = built.save(tmp_path / "engine")
    gpu_llm = LLM(str(engine_dir), device="cuda", dtype="bfloat16", max_batch_size=8)
    cpu_llm = LLM(str(engine_dir), device="cpu", dtype="bfloat16", max_batch_size=8)
    text = "The quick brown fox jumps over the lazy dog, and then it runs away into the woods. " * 3
    assert abs(gpu_llm.perplexity(text) / cpu_llm.perplexity(text) - 1) < 0.02
    prompts = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    gpu_out = [o.token_ids for o in gpu_llm.generate(prompts, params)]
    cpu_out = [o.token_ids for o in cpu_llm.generate(prompts, params)]
    assert [g[:2] for g in gpu_out] == [c[:2] for c in cpu_out], (gpu_out, cpu_out)
