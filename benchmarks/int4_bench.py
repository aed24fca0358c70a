"""INT4 (W4A16) on one GPU, in one run: Llama-3-8B decode at bs1 INT4 vs FP8, the INT4 GEMM's weight GB/s at
decode sizes (ours, torch's tinygemm int4 op, cuBLAS bf16 and our FP8 GEMM on the same shapes), and whether a
Llama-3-70B shape in INT4 fits one GPU with 64k tokens of bf16 KV cache (allocated, and one forward run).

    PYTHONPATH=core:. python benchmarks/int4_bench.py --out int4.json [--sections e2e,fit70b,gemm]

The JSON records total_s. e2e is the slowest section (it writes a 16 GB checkpoint and builds two engines): where
the whole run may pass 4 minutes, run `--sections e2e` and `--sections fit70b,gemm` as two calls.

Bytes counted for INT4: packed codes (K/2 bytes a row) + scales (2 bytes a group) + zeros (1 byte a group).
The end-to-end engines are built from the same random bf16 checkpoint (benchmarks/checkpoint.py): INT4 with
round-to-nearest and FP8 with nearest rounding (decode speed does not depend on how the codes were chosen).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import SHAPES, write_checkpoint  # noqa: E402
from kernel_bench import ceilings, graph_ms  # noqa: E402

GEMM_SHAPES = [("8B qkv", 6144, 4096), ("8B o", 4096, 4096), ("8B gate_up", 28672, 4096), ("8B down", 4096, 14336)]
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GROUP = 128
LLAMA_70B = dict(  # Llama-3.1-70B(-Instruct)'s config.json: a 128k context, so 64k tokens fit one sequence
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}, tie_word_embeddings=False)


def int4_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * (k // GROUP) * 3


def _int4_weights(n: int, k: int) -> list[tuple]:
    copies = max(2, -(-200_000_000 // int4_bytes(n, k)))  # > 4x L2 in total: every call reads from HBM
    return [(torch.randint(-2**31, 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32),
             (torch.rand(n, k // GROUP, device="cuda") * 0.01).to(torch.bfloat16),
             torch.randint(0, 16, (n, k // GROUP), device="cuda", dtype=torch.uint8)) for _ in range(copies)]


def _tinygemm_weights(n: int, k: int, copies: int) -> list[tuple] | str:
    """torch's int4 op (tinygemm, as gpt-fast uses it): packed weights and bf16 [K/G, N, 2] scales and zeros."""
    try:
        out = []
        for _ in range(copies):
            codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
            packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            out.append((torch._convert_weight_to_int4pack(packed, 8),
                        (torch.rand(k // GROUP, n, 2, device="cuda") * 0.01).to(torch.bfloat16)))
        return out
    except Exception as error:  # noqa: BLE001 - recorded: the op's packing API differs between torch versions
        return f"{type(error).__name__}: {error}"


def gemm_rows() -> list[dict]:
    from optimum_nvidia_core.kernels import fp8_gemm, int4_gemm, quantize_fp8
    from optimum_nvidia_core.kernels.int4_gemm import choose

    rows = []
    for name, n, k in GEMM_SHAPES:
        w4 = _int4_weights(n, k)
        tiny = _tinygemm_weights(n, k, len(w4))
        w16 = [(torch.randn(n, k, device="cuda") * 0.05).to(torch.bfloat16) for _ in range(max(2, len(w4) // 4))]
        w8 = [w.to(torch.float8_e4m3fn) for w in w16]
        w_scale = torch.rand(n, device="cuda") * 1e-3 + 1e-4
        x_scale = torch.tensor([0.01], device="cuda")
        for m in M_VALUES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "N": n, "K": k, "M": m}
            times = {"int4_ours": (graph_ms(lambda w: int4_gemm(x, *w), w4), int4_bytes(n, k)),
                     "fp8_ours": (graph_ms(lambda w: fp8_gemm(*quantize_fp8(x, x_scale), w, w_scale), w8), n * k),
                     "bf16_cublas": (graph_ms(lambda w: x @ w.t(), w16), 2 * n * k)}
            if isinstance(tiny, list):
                try:
                    times["int4_tinygemm"] = (graph_ms(lambda w: torch._weight_int4pack_mm(x, w[0], GROUP, w[1]),
                                                       tiny), int4_bytes(n, k))
                except Exception as error:  # noqa: BLE001 - recorded, as for the packing above
                    tiny = f"{type(error).__name__}: {error}"
            if isinstance(tiny, str):
                row["int4_tinygemm_error"] = tiny[:300]
            for key, (ms, nbytes) in times.items():
                row[key + "_us"] = ms * 1e3
                row[key + "_GBps"] = nbytes / ms / 1e6
            row["int4_picked"] = tuple(choose(x, *w4[0], None))
            print(row, flush=True)
            rows.append(row)
        del w4, w16, w8, tiny
        torch.cuda.empty_cache()
    return rows


def fit_70b(kv_tokens: int = 65536, chunk: int = 8192) -> dict:
    """Llama-3.1-70B shape with INT4 linears allocated on the GPU and a bf16 KV cache for ``kv_tokens`` tokens,
    then the engine's work at the end of a ``kv_tokens``-long context: one ``chunk``-token prefill (8,192: the
    engine's per-step budget on this card) and one decode step, attending to the whole cache (random codes, the
    earlier K/V zeros). Fits when the peak stays within the engine's share of the card (gpu_memory_utilization)."""
    from transformers import LlamaConfig

    from optimum_nvidia_core.build.int4 import Int4Recipe, swap_in_empty_int4
    from optimum_nvidia_core.build.scratch_prefill import BLOCK_SIZE, build_metadata, scratch_kv_cache
    from optimum_nvidia_core.config import EngineConfig
    from optimum_nvidia_core.layers.int4_linear import Int4Linear
    from optimum_nvidia_core.models.llama import LlamaForCausalLM

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # the peak below is this section's, not an earlier section's
    base = torch.cuda.memory_allocated()
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_70B)).to(torch.bfloat16)
    swap_in_empty_int4(model, Int4Recipe("rtn"), torch.bfloat16, "meta")
    model = model.to_empty(device="cuda").eval()
    model.tie_weights()
    _fill_random(model)
    weights = torch.cuda.memory_allocated() - base
    int4_linear = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, Int4Linear)
                      for p in m.parameters())
    num_blocks = kv_tokens // BLOCK_SIZE
    device = torch.device("cuda")
    with scratch_kv_cache(model, num_blocks), torch.no_grad():
        kv = sum(t.numel() * t.element_size() for layer in model.attention_layers() for t in (layer.k_cache,
                                                                                               layer.v_cache))
        prefill_end = kv_tokens - 1
        steps = {"prefill": (prefill_end - chunk, prefill_end), "decode": (prefill_end, kv_tokens)}
        seconds, finite = {}, True
        for step, (start, end) in steps.items():
            positions, metadata = build_metadata([(start, end)], [0], num_blocks, device)
            ids = torch.randint(0, LLAMA_70B["vocab_size"], (end - start,), device=device)
            model(ids, positions, metadata)  # tunes the INT4 GEMM for this M (and compiles)
            torch.cuda.synchronize()
            begin = time.perf_counter()
            hidden = model(ids, positions, metadata)
            finite &= bool(torch.isfinite(model.compute_logits(hidden[-1:])).all())
            seconds[step] = time.perf_counter() - begin
        peak = torch.cuda.max_memory_allocated() - base
        free, total = torch.cuda.mem_get_info()
    del model
    torch.cuda.empty_cache()
    budget = EngineConfig.model_fields["gpu_memory_utilization"].default * total
    kv_per_token = kv / kv_tokens
    return {"kv_tokens": kv_tokens, "weights_GB": weights / 1e9, "int4_linears_GB": int4_linear / 1e9,
            "kv_cache_GB": kv / 1e9, "kv_bytes_per_token": kv_per_token, "peak_allocated_GB": peak / 1e9,
            "engine_budget_GB": budget / 1e9, "kv_tokens_that_fit_budget": int((budget - (peak - kv)) / kv_per_token),
            "free_after_GB": free / 1e9, "total_GB": total / 1e9, "prefill_tokens": chunk,
            "prefill_s": seconds["prefill"], "decode_step_s": seconds["decode"], "forward_finite": finite,
            "fits": peak <= budget and finite}


def _fill_random(model) -> None:
    """Random INT4 codes with small scales, unit norms, small embeddings: finite activations all the way."""
    from optimum_nvidia_core.layers.int4_linear import Int4Linear

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Int4Linear):
                module.qweight.random_(-2**31, 2**31 - 1)
                module.scales.fill_(1e-3)
                module.zeros.fill_(8)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                param.normal_(0.0, 0.02)


def decode_bs1(ckpt: Path, options: dict, vocab: int) -> dict:
    from optimum_nvidia_core import LLM, SamplingParams

    begin = time.perf_counter()
    # max_num_tokens=256: the prompts are 128 tokens; fewer prefill graphs to capture and GEMM shapes to tune.
    llm = LLM(str(ckpt), device="cuda", max_batch_size=8, max_num_tokens=256, **options)
    build_s = time.perf_counter() - begin
    rng = random.Random(0)
    params = SamplingParams(max_tokens=256, min_tokens=256, temperature=0.0)
    llm.generate([[rng.randrange(3, vocab) for _ in range(64)]], SamplingParams(max_tokens=16, temperature=0.0))
    rates = []
    for _ in range(3):
        (out,) = llm.generate([[rng.randrange(3, vocab) for _ in range(128)]], params)
        rates.append(255 / (out.metrics.finished_time - out.metrics.first_token_time))
    # No memory figure: the engine runs in its own process, this one's allocator sees none of it.
    result = {"build_and_load_s": build_s, "decode_tok_s_bs1": sorted(rates)[1], "runs": rates}
    llm.shutdown()
    del llm
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--work-dir", default="/tmp/onv_int4")
    parser.add_argument("--sections", default="e2e,fit70b,gemm",
                        help="e2e (8B decode bs1 INT4 vs FP8, writes a 16 GB checkpoint), fit70b, gemm")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    work = Path(args.work_dir)
    os.environ.setdefault("OPTIMUM_NVIDIA_CACHE", str(work / "cache"))
    import triton

    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__}, "ceilings": ceilings()}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    save()
    began = time.perf_counter()
    if "e2e" in sections:
        start = time.perf_counter()
        ckpt = write_checkpoint("llama-3-8b", work / "llama-3-8b")
        result["checkpoint_write_s"] = time.perf_counter() - start
        vocab = SHAPES["llama-3-8b"]["vocab_size"]
        result["decode_8b"] = {
            "int4": decode_bs1(ckpt, dict(quantization="int4", int4_method="rtn"), vocab),
            "fp8": decode_bs1(ckpt, dict(use_fp8=True, weight_rounding="nearest"), vocab),
        }
        e2e = result["decode_8b"]
        e2e["int4_over_fp8"] = e2e["int4"]["decode_tok_s_bs1"] / e2e["fp8"]["decode_tok_s_bs1"]
        print("decode bs1:", e2e, flush=True)
        save()
        shutil.rmtree(work, ignore_errors=True)
    if "fit70b" in sections:
        try:
            result["fit_70b"] = fit_70b()
        except torch.cuda.OutOfMemoryError as error:  # the answer to "does it fit" is then no
            result["fit_70b"] = {"fits": False, "error": str(error)[:500]}
            torch.cuda.empty_cache()
        print("70B:", result["fit_70b"], flush=True)
        save()
    if "gemm" in sections:
        result["gemm"] = gemm_rows()
    result["total_s"] = time.perf_counter() - began
    save()
    print(f"wrote {args.out} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
