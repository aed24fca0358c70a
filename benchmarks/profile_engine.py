"""Where an engine step's time goes on the GPU (issue 9): per-step wall time by kind of batch, device time of the
replayed graphs, the LM head and the sampler (CUDA events), device time per kernel (torch.profiler, CUDA only),
and Triton compiles that happen while serving (each is a ~1 s stall).

    PYTHONPATH=core:. python benchmarks/profile_engine.py [--shape llama-2-7b] [--engines bf16,fp8] [--json out.json]

Steps are pipelined (LLMEngine.step collects the step in flight, then launches the next one), so a batch's wall
time here is the period of the step() that waits for it (start to next start): its device time plus the host
work not hidden behind it.
The breakdowns in benchmarks/NOTES.md ("Third pass") come from this script.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import SHAPES, write_checkpoint

ENGINES = {"bf16": {}, "fp8": {"use_fp8": True, "weight_rounding": "nearest"},
           "fp8kv": {"use_fp8": True, "weight_rounding": "nearest", "kv_cache_dtype": "fp8"}}


class Probe:
    """Wraps an engine's pieces (instance attributes only) to record step periods and device times."""

    def __init__(self, engine):
        self.steps: list[dict] = []  # one per step(): start time and the kind of batch it launched
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.compiles: list[tuple[str, float]] = []
        runner = engine.runner
        engine.step = self._wrap_step(engine.step)
        runner.launch = self._wrap_launch(runner.launch)
        if runner.graphs is not None:
            runner.graphs.run = self._device_timed(runner.graphs.run, lambda ids, pos, attn: (
                f"graph s{attn.num_seqs} q{attn.max_query_len}"))
        runner.model.compute_logits = self._device_timed(runner.model.compute_logits, lambda h: f"lm_head s{len(h)}")
        sample = runner.sampler.__call__
        runner.sampler = self._device_timed(sample, lambda logits, batch: f"sampler s{len(logits)}")

    def _wrap_step(self, step):
        def timed():
            self.steps.append({"start": time.perf_counter(), "kind": None})
            return step()
        return timed

    def _wrap_launch(self, launch):
        def timed(batch, allowed=None):
            q = batch.num_query_tokens
            kind = "decode" if max(q) == 1 else ("prefill" if min(q) > 1 else "mixed")
            if self.steps:
                self.steps[-1].update(kind=kind, seqs=len(q), tokens=sum(q))
            return launch(batch, allowed)
        return timed

    def _device_timed(self, fn, name_of):
        def timed(*args):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
            self.events.append((name_of(*args), start, end))
            return out
        return timed

    def take(self) -> dict:
        """Summary since the last take(): step periods by kind (ms) and device times by name (median ms)."""
        torch.cuda.synchronize()
        periods: dict[str, list[float]] = {}
        # A batch launched by step i is waited for by step i+1: its period is step i+1's (start to start).
        for launched, collecting, after in zip(self.steps, self.steps[1:], self.steps[2:]):
            if launched["kind"]:
                periods.setdefault(launched["kind"], []).append(1e3 * (after["start"] - collecting["start"]))
        device: dict[str, list[float]] = {}
        for name, start, end in self.events:
            device.setdefault(name, []).append(start.elapsed_time(end))
        self.steps, self.events = self.steps[-1:], []
        return {"step_ms": {k: {"n": len(v), "median": statistics.median(v), "sum": sum(v)} for k, v in periods.items()},
                "device_ms": {k: {"n": len(v), "median": statistics.median(v)} for k, v in device.items() if len(v) > 2}}


def log_triton_compiles(into: list) -> None:
    from triton.runtime.jit import JITFunction

    if not hasattr(JITFunction, "_do_compile"):
        return
    compile_fn = JITFunction._do_compile

    def timed(self, *args, **kwargs):
        begin = time.perf_counter()
        try:
            return compile_fn(self, *args, **kwargs)
        finally:
            into.append((getattr(self, "__name__", "?"), round(time.perf_counter() - begin, 2)))
    JITFunction._do_compile = timed


def kernel_table(prof, per: int, top: int = 15) -> dict:
    """Device time per kernel name (us per `per`), the biggest first."""
    totals = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0)
        if us > 0 and event.device_type.name == "CUDA":
            totals[event.key[:70]] = (round(us / per, 1), event.count / per)
    ordered = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {"total_ms": sum(v[0] for v in totals.values()) / 1e3, "top": ordered[:top]}


def profile(ckpt: Path, options: dict, vocab: int, compiles: list) -> dict:
    from optimum_nvidia_core import LLM, SamplingParams
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rng = random.Random(0)
    prompts = lambda n, length: [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]
    greedy = lambda n: SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0)
    # The probe wraps the engine core's methods: the core runs on a thread of this process for it.
    llm = LLM(str(ckpt), device="cuda", max_batch_size=256, engine_process=False, **options)
    llm.generate(prompts(4, 64), greedy(8))  # warm-up
    probe = Probe(llm._worker.client.core)
    served_from = len(compiles)
    result = {}
    for n in (128, 512, 2048):
        ttft = []
        for _ in range(3):
            (out,) = llm.generate(prompts(1, n), greedy(1))
            ttft.append(1e3 * (out.metrics.first_token_time - out.metrics.arrival_time))
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts(1, n), greedy(1))
        result[f"ttft_{n}"] = {"ttft_ms": ttft, **probe.take(), "kernels": kernel_table(prof, 1)}
    llm.generate(prompts(1, 128), greedy(64))
    result["decode_bs1"] = probe.take()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts(1, 128), greedy(33))
    result["decode_bs1"]["kernels_per_step"] = kernel_table(prof, 32, top=20)
    for concurrency in (64, 256):
        begin = time.perf_counter()
        llm.generate(prompts(concurrency, 128), greedy(128))
        seconds = time.perf_counter() - begin
        result[f"concurrent_{concurrency}"] = {"out_tok_s": concurrency * 128 / seconds, **probe.take()}
    result["triton_compiles_while_serving"] = compiles[served_from:]
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--engines", default="bf16,fp8", help="comma-separated: " + ", ".join(ENGINES))
    parser.add_argument("--work-dir", default="/tmp/onv_profile")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("OPTIMUM_NVIDIA_CACHE", str(Path(args.work_dir) / "cache"))
    ckpt = write_checkpoint(args.shape, Path(args.work_dir) / args.shape)
    compiles: list = []
    log_triton_compiles(compiles)
    report = {"gpu": torch.cuda.get_device_name(), "shape": args.shape}
    for name in args.engines.split(","):
        report[name] = profile(ckpt, ENGINES[name], SHAPES[args.shape]["vocab_size"], compiles)
        print(name, json.dumps(report[name], default=str)[:4000], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
