"""End-to-end benchmark on one GPU: stock transformers (eager, bf16) and ours (bf16, FP8, FP8 + FP8 KV cache) in
ONE run, on random-weight checkpoints shaped like Llama-2-7B / Llama-3-8B, loaded from local disk as a user's
checkpoint is.

    PYTHONPATH=core:. python benchmarks/bench.py [--runs llama-2-7b:transformers+bf16+fp8+fp8kv,llama-3-8b:fp8kv] [--long]

Measures: time to first token at bs1 (128/512/2048 prompt tokens); decode tok/s at bs1; output tok/s at
1/8/64/256/1024 concurrent requests (128 in / 128 out; --long adds 1000 in / 1000 out at 256, transformers at 64); the seed's metric
((input + output tokens) / time); % of the decode roofline (bytes a step must read / read bandwidth measured in
this run); FP8 build and cached load time; peak GPU memory. Writes benchmarks/results/<date>-<gpu>.md and .json
(and a copy into $OUT when set). Every figure is measured here; nothing is carried over from other runs.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import SHAPES, weight_bytes, write_checkpoint  # noqa: E402
from kernel_bench import ceilings  # noqa: E402
from report import write_report  # noqa: E402

TTFT_LENGTHS = (128, 512, 2048)
CONCURRENCY = (1, 8, 64, 256, 1024)
TRANSFORMERS_CONCURRENCY = (1, 8, 64, 256)  # 1,024 sequences of stock generate() would take minutes
CONFIGS = {"bf16": dict(use_fp8=False), "fp8": dict(use_fp8=True),
           "fp8kv": dict(use_fp8=True, kv_cache_dtype="fp8")}


def random_prompts(count: int, length: int, vocab: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


# ---- stock transformers -----------------------------------------------------------------------------------------
def bench_transformers(ckpt: Path, vocab: int, rng: random.Random, long: bool) -> dict:
    from transformers import AutoModelForCausalLM

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16, device_map="cuda").eval()
    result = {"load_s": time.perf_counter() - start, "attn_implementation": model.config._attn_implementation}

    def generate(prompts: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(prompts, device="cuda")
        begin = sync_time()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return sync_time() - begin

    generate(random_prompts(1, 128, vocab, rng), 4)  # warm-up
    result["ttft_ms"] = {n: 1e3 * statistics.median(generate(random_prompts(1, n, vocab, rng), 1) for _ in range(3))
                         for n in TTFT_LENGTHS}
    prompt = random_prompts(1, 128, vocab, rng)
    total = generate(prompt, 129)
    result["decode_tok_s_bs1"] = 128 / (total - result["ttft_ms"][128] / 1e3)
    result["throughput"] = {}
    for concurrency in TRANSFORMERS_CONCURRENCY:
        seconds = generate(random_prompts(concurrency, 128, vocab, rng), 128)
        result["throughput"][concurrency] = _throughput(concurrency, 128, 128, seconds)
        print("transformers", concurrency, result["throughput"][concurrency], flush=True)
    if long:
        seconds = generate(random_prompts(64, 1000, vocab, rng), 1000)
        result["throughput_long_64"] = _throughput(64, 1000, 1000, seconds)
    result["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    free_gpu()
    return result


def _throughput(requests: int, prompt_len: int, out_len: int, seconds: float) -> dict:
    return {"seconds": seconds, "output_tok_s": requests * out_len / seconds,
            "seed_metric_tok_s": requests * (prompt_len + out_len) / seconds}


# ---- ours -------------------------------------------------------------------------------------------------------
def start_llm(ckpt: Path, options: dict):
    from optimum_nvidia_core import LLM, SamplingParams

    begin = time.perf_counter()
    llm = LLM(str(ckpt), device="cuda", **options)  # max_batch_size / max_num_tokens: "auto" from GPU memory
    llm.generate([[5] * 8], SamplingParams(max_tokens=2, temperature=0.0))  # ready to serve
    return llm, time.perf_counter() - begin


def bench_ours(ckpt: Path, name: str, vocab: int, rng: random.Random, long: bool, weight_rounding: str) -> dict:
    from optimum_nvidia_core import SamplingParams

    options = dict(CONFIGS[name])
    if options.get("use_fp8"):
        options["weight_rounding"] = weight_rounding
    free_gpu()
    torch.cuda.reset_peak_memory_stats()
    result = {}
    llm, seconds = start_llm(ckpt, options)
    result["first_start_s"] = seconds  # includes the FP8 build (quantize + calibrate + write) when use_fp8
    if options.get("use_fp8"):
        llm.shutdown()
        del llm
        free_gpu()
        llm, seconds = start_llm(ckpt, options)
        result["cached_start_s"] = seconds
    result["total_kv_blocks"] = llm.stats().get("total_blocks")

    def params(n: int):
        return SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0)

    def run(prompts, out_len):
        outs = llm.generate(prompts, params(out_len))
        begin = min(o.metrics.arrival_time for o in outs)
        end = max(o.metrics.finished_time for o in outs)
        assert all(len(o.token_ids) == out_len for o in outs), "a request stopped early"
        return outs, end - begin

    run(random_prompts(4, 64, vocab, rng), 8)  # warm-up
    ttft = {}
    for n in TTFT_LENGTHS:
        samples = []
        for _ in range(3):  # a fresh prompt each time: no prefix-cache hits
            (out,), _ = run(random_prompts(1, n, vocab, rng), 1)
            samples.append(out.metrics.first_token_time - out.metrics.arrival_time)
        ttft[n] = 1e3 * statistics.median(samples)
    result["ttft_ms"] = ttft
    (out,), _ = run(random_prompts(1, 128, vocab, rng), 256)
    result["decode_tok_s_bs1"] = 255 / (out.metrics.finished_time - out.metrics.first_token_time)
    result["throughput"] = {}
    for concurrency in CONCURRENCY:
        _, seconds = run(random_prompts(concurrency, 128, vocab, rng), 128)
        result["throughput"][concurrency] = _throughput(concurrency, 128, 128, seconds)
        print(name, concurrency, result["throughput"][concurrency], flush=True)
    if long:
        _, seconds = run(random_prompts(256, 1000, vocab, rng), 1000)
        result["throughput_long_256"] = _throughput(256, 1000, 1000, seconds)
    result["engine_stats"] = llm.stats()
    result["peak_memory_GiB"] = result["engine_stats"].get("gpu_peak_memory_bytes", 0) / 2**30  # the core's process
    llm.shutdown()
    del llm
    free_gpu()
    return result


def free_gpu() -> None:
    """Return the last engine's memory to the driver: the next engine sizes its KV cache from free memory."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def roofline(shape: str, name: str, read_tbps: float, context: int) -> float:
    """Decode tok/s at bs1 if every byte a step must read moved at the measured read bandwidth."""
    linear_bytes = 1 if name in ("fp8", "fp8kv") else 2
    sizes = weight_bytes(shape, linear_bytes)
    kv_bytes = sizes["kv_per_token"] * context * (1 if name == "fp8kv" else 2)
    return read_tbps * 1e12 / (sizes["linear"] + sizes["lm_head"] + kv_bytes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="llama-2-7b:transformers+bf16+fp8+fp8kv,llama-3-8b:bf16+fp8kv",
                        help="shape:engine+engine,... with engines from transformers, " + ", ".join(CONFIGS))
    parser.add_argument("--long", action="store_true", help="add 1000 in / 1000 out at 64 concurrent")
    parser.add_argument("--weight-rounding", default="gptq", choices=("gptq", "nearest"),
                        help="FP8 weight rounding of the engines built here (speed is the same; GPTQ builds slower)")
    parser.add_argument("--work-dir", default="/tmp/onv_bench")
    parser.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    work = Path(args.work_dir)
    os.environ.setdefault("OPTIMUM_NVIDIA_CACHE", str(work / "cache"))  # FP8 engines built fresh in this run
    rng = random.Random(0)
    import transformers
    import triton

    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "transformers": transformers.__version__},
              "ceilings": ceilings(), "weight_rounding": args.weight_rounding, "models": {}}
    print(result, flush=True)
    stem = f"{result['date']}-{result['gpu'].replace(' ', '_')}"
    for run in args.runs.split(","):
        shape, engines = run.split(":")
        begin = time.perf_counter()
        ckpt = write_checkpoint(shape, work / shape)
        entry = result["models"][shape] = {"checkpoint_write_s": time.perf_counter() - begin}
        vocab = SHAPES[shape]["vocab_size"]
        for name in engines.split("+"):
            try:
                if name == "transformers":
                    entry[name] = bench_transformers(ckpt, vocab, rng, args.long)
                else:
                    entry[name] = bench_ours(ckpt, name, vocab, rng, args.long, args.weight_rounding)
                    entry[name]["roofline_tok_s_bs1"] = roofline(shape, name, result["ceilings"]["read_TBps"], 256)
                    entry[name]["roofline_pct_bs1"] = 100 * entry[name]["decode_tok_s_bs1"] / \
                        entry[name]["roofline_tok_s_bs1"]
            except Exception as error:  # keep the other configurations' numbers
                entry[name] = {"error": f"{type(error).__name__}: {error}"}
                import traceback
                traceback.print_exc()
            save(result, args.results_dir, stem)
        # Scratch: the next shape's checkpoint and engines need the disk (64 GiB on the test machines).
        shutil.rmtree(work / shape, ignore_errors=True)
        shutil.rmtree(os.environ["OPTIMUM_NVIDIA_CACHE"], ignore_errors=True)
    print(Path(args.results_dir, stem + ".md").read_text())


def save(result: dict, results_dir: str, stem: str) -> None:
    """Write the json and the markdown table after each section, so a time-out still leaves numbers."""
    targets = [Path(results_dir)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        write_report(result, folder / f"{stem}.md")


if __name__ == "__main__":
    main()
