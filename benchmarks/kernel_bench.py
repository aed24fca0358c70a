"""Kernel microbenchmarks on the GPU: memory ceilings, decode GEMMs (ours vs cuBLAS), paged decode attention.

Ceilings are medians of triton.testing.do_bench. Kernels are timed replayed from a CUDA graph (`graph_ms`):
launched one by one from Python, a kernel of a few microseconds is timed at the host's launch rate (~20 us a
launch on the H100 hosts), which hid the real decode GEMM times before. GEMMs rotate over enough weight copies
that the L2 cache (50 MB) cannot serve them; attention repeats one input (small caches may sit in L2). Bytes
counted: every weight once (decode GEMMs); K and V of every context token once (attention).

    PYTHONPATH=core:. python benchmarks/kernel_bench.py [--sweep] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import triton
from triton.testing import do_bench

FP8 = torch.float8_e4m3fn
# (name, N, K) of the decode GEMMs of Llama-2-7B and Llama-3-8B
GEMM_SHAPES = [("7B qkv", 12288, 4096), ("7B o", 4096, 4096), ("7B gate_up", 22016, 4096),
               ("7B down", 4096, 11008), ("8B qkv", 6144, 4096), ("8B gate_up", 28672, 4096),
               ("8B down", 4096, 14336)]


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def ceilings() -> dict:
    """Read bandwidth (sum over 2 GiB), copy bandwidth, bf16 and fp8 GEMM rates at 8192^3, on random data."""
    x = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    read_ms = median_ms(lambda: x.sum())
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x))
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = median_ms(lambda: a @ b)
    a8, b8 = a.to(FP8), b.to(FP8).t()
    one = torch.ones((), device="cuda")
    fp8_ms = median_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    flops = 2 * 8192**3
    return {"read_TBps": 2**31 / read_ms / 1e9, "copy_TBps": 2 * 2**31 / copy_ms / 1e9,
            "bf16_gemm_TFLOPs": flops / gemm_ms / 1e9, "fp8_gemm_TFLOPs": flops / fp8_ms / 1e9}


def _weights(n: int, k: int, dtype) -> list[torch.Tensor]:
    copies = max(2, math.ceil(200e6 / (n * k * (1 if dtype == FP8 else 2))))  # > 4x L2 in total
    return [(torch.randn(n, k, device="cuda") * 0.05).to(dtype) for _ in range(copies)]


def graph_ms(fn, items) -> float:
    """ms per call of fn(item), one call per item recorded in a CUDA graph, median of 5 replays."""
    for item in items:
        fn(item)  # compiles, and runs the FP8 tuner outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for item in items:
            fn(item)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(items))
    return sorted(times)[2]


def gemm_rows(m_values=(1, 16, 64), configs=None, shapes=GEMM_SHAPES) -> list[dict]:
    """Weight bytes per second of each decode GEMM: cuBLAS bf16, cuBLAS fp8 (_scaled_mm per tensor on an e4m3
    input), ours with the activation quantization (static and dynamic scale) and ours on an e4m3 input."""
    from optimum_nvidia_core.kernels import fp8_gemm, quantize_fp8
    from optimum_nvidia_core.kernels.fp8_gemm import choose

    rows = []
    for name, n, k in shapes:
        w16, w8 = _weights(n, k, torch.bfloat16), _weights(n, k, FP8)
        w_scale = torch.rand(n, device="cuda") * 1e-3 + 1e-4
        x_scale = torch.tensor([0.01], device="cuda")
        one = torch.ones((), device="cuda")
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x8, row_scale = quantize_fp8(x, x_scale)
            row = {"shape": name, "N": n, "K": k, "M": m}
            times = {
                "cublas_bf16": graph_ms(lambda w: x @ w.t(), w16),
                "cublas_fp8": graph_ms(lambda w: torch._scaled_mm(
                    x8, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), w8),
                "ours_fp8": graph_ms(lambda w: fp8_gemm(*quantize_fp8(x, x_scale), w, w_scale), w8),
                "ours_fp8_dynamic": graph_ms(lambda w: fp8_gemm(*quantize_fp8(x, None), w, w_scale), w8),
                "ours_gemm_only": graph_ms(lambda w: fp8_gemm(x8, row_scale, w, w_scale), w8),
            }
            for config in configs or []:
                times[f"cfg{tuple(config)}"] = graph_ms(
                    lambda w, c=config: fp8_gemm(x8, row_scale, w, w_scale, config=c), w8)
            for key, ms in times.items():
                weight_bytes = n * k * (2 if key == "cublas_bf16" else 1)
                row[key + "_us"] = ms * 1e3
                row[key + "_TBps"] = weight_bytes / ms / 1e9
            row["picked"] = tuple(choose(x8, row_scale, w8[0], w_scale, None, torch.bfloat16))
            rows.append(row)
        del w16, w8
        torch.cuda.empty_cache()
    return rows


def attention_rows() -> list[dict]:
    """Paged decode attention, Llama-2-7B (32 KV heads) and Llama-3-8B (8 KV heads) layer shapes."""
    from optimum_nvidia_core.kernels import paged_attention
    from optimum_nvidia_core.attention_metadata import AttentionMetadata

    rows = []
    block_size = 16
    for label, heads, kv_heads in (("7B", 32, 32), ("8B", 32, 8)):
        for batch, ctx in ((1, 512), (1, 4096), (64, 512), (256, 256)):
            for kv_dtype in (torch.bfloat16, FP8):
                blocks_per_seq = triton.cdiv(ctx, block_size)
                num_blocks = batch * blocks_per_seq
                k_cache = torch.randn(num_blocks, block_size, kv_heads, 128, device="cuda").to(kv_dtype)
                v_cache = torch.randn_like(k_cache, dtype=torch.float32).to(kv_dtype)
                tables = torch.randperm(num_blocks, dtype=torch.int32).view(batch, blocks_per_seq).numpy()
                _, meta = AttentionMetadata.build(tables, [1] * batch, [ctx] * batch, block_size, "cuda")
                q = torch.randn(batch, heads, 128, device="cuda", dtype=torch.bfloat16)
                one = torch.ones(1, device="cuda")
                ms = graph_ms(lambda _: paged_attention(q, k_cache, v_cache, one, one, meta, 0.088), [None] * 10)
                kv_bytes = 2 * batch * ctx * kv_heads * 128 * k_cache.element_size()
                rows.append({"model": label, "batch": batch, "context": ctx, "kv_dtype": str(kv_dtype)[6:],
                             "us": ms * 1e3, "TBps": kv_bytes / ms / 1e9})
                del k_cache, v_cache
    return rows


def print_table(rows: list[dict], keys: list[str]) -> None:
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys))


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time every fp8 GEMM candidate at M=1 and 16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "ceilings": ceilings()}
    print(result)
    result["attention"] = attention_rows()
    print_table(result["attention"], ["model", "batch", "context", "kv_dtype", "us", "TBps"])
    result["gemm"] = gemm_rows()
    print_table(result["gemm"], ["shape", "M", "cublas_bf16_TBps", "cublas_fp8_TBps", "ours_fp8_TBps",
                                 "ours_fp8_dynamic_TBps", "ours_gemm_only_TBps", "ours_fp8_us", "picked"])
    if args.sweep:  # every candidate of the tuner, timed alone, for the 7B shapes
        from optimum_nvidia_core.kernels.fp8_gemm import candidates
        for m in (1, 16):
            rows = gemm_rows(m_values=(m,), configs=candidates(m)[1:], shapes=GEMM_SHAPES[:4])
            result[f"sweep_m{m}"] = rows
            for row in rows:
                best = sorted((v, k) for k, v in row.items() if k.startswith("cfg") and k.endswith("_us"))[:3]
                print(row["shape"], m, "ours", f"{row['ours_fp8_us']:.1f}us", "best:",
                      [(f"{v:.1f}", k) for v, k in best])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
