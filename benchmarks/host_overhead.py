"""Host work of one engine-core step, measured with a tiny model (issue 9, issue 13).

    PYTHONPATH=core:. python benchmarks/host_overhead.py [--seqs 1,256,1024] [--steps 30] [--sampled] [--profile]
                                                         [--device cuda] [--clock cpu] [--out results.json]

Runs the real ``EngineCore.step`` loop (token ids in, token ids out: no detokenizer, that is the output
processor's, off the core) on a tiny random LLaMA (hidden 64, 2 layers, vocab 512) with N concurrent decoding
sequences, and splits each decode step's wall time into phases (ms per step):
  schedule    Scheduler.schedule
  prepare     ModelRunner.prepare (persistent batch -> the step's input tensors, one staging copy)
  forward     the model forward and the LM head (tiny here; on a GPU the replayed CUDA graph's launch)
  sample      SamplingBatch + Sampler + the wait for the tokens (ModelRunner.launch/collect, the rest)
  postprocess the rest of step(): placeholders resolved, token-level finishes, the outputs built
Everything but ``forward`` is host work. With asynchronous scheduling the GPU runs step N while the host
prepares step N+1 and accounts step N-1; on the CPU nothing overlaps. One torch thread, so the numbers are
about Python, not about the shared cores. With ``--device cuda`` the forward is asynchronous: ``forward`` is only
the launch and the GPU time shows up in ``sample`` (its wait for the tokens).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PHASES = ("schedule", "prepare", "forward", "sample", "postprocess")
CLOCK = [time.perf_counter]  # --clock cpu: time.thread_time, this thread's CPU time (a shared machine's load aside)


def make_engine(model_dir: Path, max_batch_size: int, device: str):
    from optimum_nvidia_core.config import EngineConfig
    from optimum_nvidia_core.engine.core import EngineCore

    config = EngineConfig(model=str(model_dir), device=device, max_batch_size=max_batch_size,
                          max_num_tokens=max(2048, max_batch_size), max_seq_len=512, block_size=16)
    return EngineCore(config)


def write_model(out_dir: Path) -> Path:
    from tests.tiny_models import write_tiny_checkpoint, write_tiny_tokenizer

    write_tiny_checkpoint(out_dir, "llama3", seed=0)
    write_tiny_tokenizer(out_dir)
    return out_dir


class PhaseTimer:
    """Wraps the engine's pieces (instance attributes only) to add their wall time to per-phase totals."""

    def __init__(self, engine):
        self.totals: dict[str, float] = defaultdict(float)
        self.enabled = False
        runner = engine.runner
        engine.scheduler.schedule = self._timed(engine.scheduler.schedule, "schedule")
        runner.prepare = self._timed(runner.prepare, "prepare")
        runner.model.forward = self._timed(runner.model.forward, "forward")
        runner.model.compute_logits = self._timed(runner.model.compute_logits, "forward")  # the LM head: device work
        if runner.graphs is not None:  # CUDA: decode replays a graph; only its launch is timed here
            runner.graphs.run = self._timed(runner.graphs.run, "forward")

    def _timed(self, fn, phase: str):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            begin = CLOCK[0]()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.enabled:
                    self.totals[phase] += CLOCK[0]() - begin
        return wrapper


def measure(engine, num_seqs: int, steps: int, sampled: bool, profile: bool) -> dict[str, float]:
    from optimum_nvidia_core.engine.interface import EngineCoreRequest
    from optimum_nvidia_core.sampling_params import SamplingParams

    warmup = 4
    params = SamplingParams(max_tokens=warmup + steps + 8, ignore_eos=True, seed=0,
                            temperature=0.8 if sampled else 0.0, top_p=0.95 if sampled else 1.0)
    for i in range(num_seqs):
        engine.add_request(EngineCoreRequest(f"r{i}", [3 + (i + j) % 400 for j in range(24)], params))
    timer = PhaseTimer(engine)
    while any(s.num_output_tokens == 0 for r in engine.requests.values() for s in r.seqs):  # prefill
        engine.step()
    for _ in range(warmup):
        engine.step()
    profiler = cProfile.Profile() if profile else None
    timer.enabled = True
    engine.runner.timed_run_s = 0.0
    step_total = 0.0
    if profiler:
        profiler.enable()
    for _ in range(steps):
        begin = CLOCK[0]()
        engine.step()
        step_total += CLOCK[0]() - begin
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    timer.enabled = False
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    while engine.has_unfinished():
        engine.step()
    t = timer.totals
    ms = {"schedule": t["schedule"], "prepare": t["prepare"], "forward": t["forward"]}
    run_total = engine.runner.timed_run_s
    ms["sample"] = run_total - t["prepare"] - t["forward"]
    ms["postprocess"] = step_total - t["schedule"] - run_total
    ms = {k: 1e3 * v / steps for k, v in ms.items()}
    ms["host"] = sum(v for k, v in ms.items() if k != "forward")
    ms["us_per_seq"] = 1e3 * ms["host"] / num_seqs
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="1,256,1024")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sampled", action="store_true", help="temperature 0.8, top_p 0.95 instead of greedy")
    parser.add_argument("--device", default="cpu", help="cuda: forward replays CUDA graphs, copies are real H2D")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured steps (top 25 by own time)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: count this thread's CPU time only (on a machine shared with other jobs)")
    args = parser.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.thread_time
    torch.set_num_threads(1)
    counts = [int(n) for n in args.seqs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(write_model(Path(tmp)), max(counts), args.device)
        _time_runner(engine.runner)
        header = " ".join(f"{p:>11}" for p in PHASES)
        print(f"{'seqs':>5} {header} {'host total':>11} {'us/seq':>7}  (ms per decode step, {args.device}, "
              f"{args.clock} clock)")
        for n in counts:
            ms = measure(engine, n, args.steps, args.sampled, args.profile)
            rows.append({"seqs": n, **ms})
            print(f"{n:>5} " + " ".join(f"{ms[p]:>11.3f}" for p in PHASES) + f" {ms['host']:>11.3f}"
                  f" {ms['us_per_seq']:>7.2f}", flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        Path(args.out).write_text(json.dumps({"device": device, "sampled": args.sampled, "clock": args.clock, "rows": rows}, indent=1))


def _time_runner(runner) -> None:
    """Accumulate ModelRunner.launch + collect wall time into runner.timed_run_s (prepare + forward + sample)."""
    runner.timed_run_s = 0.0
    for name in ("launch", "collect"):
        fn = getattr(runner, name)

        def timed(*args, _fn=fn, **kwargs):
            begin = CLOCK[0]()
            try:
                return _fn(*args, **kwargs)
            finally:
                runner.timed_run_s += CLOCK[0]() - begin
        setattr(runner, name, functools.wraps(fn)(timed))


if __name__ == "__main__":
    main()
