"""Host time per decode step with 0, 1 and N guided (grammar-constrained) rows in a batch (issue 13 item 4).

    PYTHONPATH=core:. python benchmarks/guided_overhead.py [--seqs 64] [--guided 0,1,64] [--steps 30]
        [--device cpu|cuda] [--tokenizer DIR] [--out results.json]

Drives the real ``EngineCore.step`` loop on a tiny random LLaMA (hidden 64, 2 layers) whose vocabulary is a real
tokenizer's (default SmolLM2's, 49,152 tokens, so JSON tokens exist and a mask row is 1,536 words; ``--tokenizer``
takes a directory with tokenizer.json and tokenizer_config.json, e.g. copied to a GPU machine without the model). Every row decodes; the guided ones generate a
forced tool call repeated (an array of at least 64 calls, so no row finishes while it is measured). Per step, in ms:
  step       the whole EngineCore.step
  forward    the model forward (on a GPU: the launch; the GPU work is not host time)
  logits     the LM head on the sampled rows (device work)
  sample     the sampler, the grammar mask included (device work on a GPU; on the CPU it runs inline)
  mask       of which: unpacking and applying the bitmask to the logits
  fill       filling the guided rows of the bitmask (xgrammar, in place) and queueing its one copy
  accept     advancing the matchers by the sampled tokens
  host       step - forward - logits - sample: the host work (scheduling, inputs, fill, accept, outputs)
``fill`` + ``accept`` is what guided rows add to the host's work per step; on a GPU ``mask`` leaves the host.
The grammar vocabulary is built in the background when the engine starts; this waits for it before measuring,
and each measurement's grammar is compiled (in the pool) before its steps are timed.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "unit", "days"]}}}]
PARTS = ("step", "forward", "logits", "sample", "mask", "fill", "accept", "host")


def write_model(out_dir: Path, tokenizer_dir: Path | None) -> tuple[Path, int]:
    """A tiny random checkpoint with a real tokenizer's files and vocabulary size (rounded up to 64, as padded
    embeddings are). Returns (its directory, the vocabulary size)."""
    from transformers import AutoTokenizer

    from tests.tiny_models import write_tiny_checkpoint

    if tokenizer_dir is None:
        from optimum_nvidia_core.hub import DEFAULT_MODEL, resolve_model

        tokenizer_dir = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = -(-len(tokenizer) // 64) * 64
    eos = tokenizer.eos_token_id
    write_tiny_checkpoint(out_dir, "llama3", seed=0, vocab_size=vocab, bos_token_id=tokenizer.bos_token_id or eos,
                          eos_token_id=eos, pad_token_id=eos)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir, vocab


def guided_schema() -> dict:
    from optimum_nvidia_core.tool_calls import tool_call_schema

    call = tool_call_schema(TOOLS, "get_weather")
    return {"type": "object", "properties": {"calls": {"type": "array", "items": call, "minItems": 64}},
            "required": ["calls"]}


class Timers:
    """Wall time of the engine's pieces, added per part while ``enabled``."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.enabled = False

    def wrap(self, owner, name: str, part: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.enabled:
                    self.totals[part] += time.perf_counter() - begin
        setattr(owner, name, timed)


def measure(core, num_seqs: int, num_guided: int, steps: int) -> dict[str, float]:
    from optimum_nvidia_core.engine.interface import EngineCoreRequest
    from optimum_nvidia_core.sampling_params import SamplingParams

    budget = 4 + steps + 64
    plain = SamplingParams(max_tokens=budget, min_tokens=budget, temperature=0.0)
    guided = SamplingParams(max_tokens=budget, temperature=0.0, guided_json=guided_schema())
    for i in range(num_seqs):
        prompt = [3 + (i + j) % 400 for j in range(24)]
        core.add_request(EngineCoreRequest(f"r{num_guided}-{i}", prompt, guided if i < num_guided else plain))
    while core._awaiting_grammar or any(s.num_output_tokens < 4 for r in core.requests.values() for s in r.seqs):
        core.step()  # compile, prefill, a few decode steps
    timers = core.benchmark_timers
    timers.enabled = True
    timers.totals.clear()
    for _ in range(steps):
        begin = time.perf_counter()
        core.step()
        timers.totals["step"] += time.perf_counter() - begin
    timers.enabled = False
    running = sum(1 for r in core.requests.values() for s in r.seqs if not s.is_finished)
    for request_id in list(core.requests):
        core.abort_request(request_id)
    while core.has_unfinished():
        core.step()
    if running != num_seqs:
        raise RuntimeError(f"only {running} of {num_seqs} rows ran the whole measurement")
    ms = {part: 1e3 * timers.totals[part] / steps for part in PARTS[:-1]}
    ms["host"] = ms["step"] - ms["forward"] - ms["logits"] - ms["sample"]
    return ms


def make_core(model_dir: Path, max_batch_size: int, device: str):
    from optimum_nvidia_core.config import EngineConfig
    from optimum_nvidia_core.engine import core as core_module
    from optimum_nvidia_core.layers import sampler

    config = EngineConfig(model=str(model_dir), device=device, max_batch_size=max_batch_size,
                          max_num_tokens=max(2048, max_batch_size), max_seq_len=512, block_size=16)
    engine = core_module.EngineCore(config)
    timers = Timers()
    timers.wrap(engine.runner.model, "forward", "forward")
    timers.wrap(engine.runner, "compute_logits", "logits")
    timers.wrap(engine.runner, "sampler", "sample")
    timers.wrap(engine, "_grammar_masks", "fill")
    timers.wrap(sampler, "apply_token_bitmask", "mask")
    engine.benchmark_timers = timers
    return engine, timers


def wrap_accept(timers: Timers) -> None:
    from optimum_nvidia_core.guided import Matcher

    timers.wrap(Matcher, "accept", "accept")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=64, help="rows decoding in every step")
    parser.add_argument("--guided", default="0,1,64", help="how many of them are guided, per measurement")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json (default: SmolLM2's)")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = [int(n) for n in args.guided.split(",")]
    results = {"device": args.device, "seqs": args.seqs, "steps": args.steps, "rows": {}}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, results["vocab"] = write_model(Path(tmp), args.tokenizer)
        core, timers = make_core(model_dir, args.seqs, args.device)
        wrap_accept(timers)
        core._guided.stop_token_ids  # wait for the background vocabulary: steady state is what is measured
        print(f"{'guided':>6} " + " ".join(f"{p:>9}" for p in PARTS) + f"  (ms per decode step, {args.seqs} rows, "
              f"{args.device})")
        for n in counts:
            ms = measure(core, args.seqs, min(n, args.seqs), args.steps)
            results["rows"][str(n)] = ms
            print(f"{n:>6} " + " ".join(f"{ms[p]:>9.3f}" for p in PARTS), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
