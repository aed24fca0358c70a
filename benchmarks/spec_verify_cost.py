"""The cost of a speculative verify step (1 sequence, k + 1 query tokens) against a plain decode step (1 token),
and the bs1 speed-up that implies at a measured acceptance.

    PYTHONPATH=core:. python benchmarks/spec_verify_cost.py --out /tmp/spec_verify_cost.json          # H200
    PYTHONPATH=core:. python benchmarks/spec_verify_cost.py --device cpu --shape tiny --out /tmp/v.json  # smoke

A random-weight checkpoint of the shape (benchmarks/checkpoint.py) is loaded through the engine's loading path
(FP8 + FP8 KV by default: the build is the one users get, with nearest rounding since speed does not depend on
it) and driven through the engine's ModelRunner: its KV cache, its CUDA graphs (a decode graph for 1 token; a
verify step of one sequence replays the prefill graph of the smallest token bucket that holds k + 1 tokens, as
the runner does today), ``prepare`` for the step's inputs and attention metadata. A step = forward + LM head on
the rows verification reads (1 or k + 1) + argmax; timed with CUDA events after warm-up (median). Speed-up at
an acceptance of a tokens per verify step: a / (verify time / plain time), host work aside (the proposer's own
host time per step is measured and reported alongside).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import write_checkpoint, write_random_checkpoint, write_tokenizer  # noqa: E402

CONFIGS = {"bf16": dict(use_fp8=False), "fp8": dict(use_fp8=True), "fp8kv": dict(use_fp8=True, kv_cache_dtype="fp8")}
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False)
ACCEPTANCE = Path(__file__).resolve().parent / "results" / "2026-12-01-cpu-spec-acceptance.json"


def checkpoint(shape: str, work: Path, device: str) -> Path:
    if shape != "tiny":
        return write_checkpoint(shape, work / shape)
    from transformers import LlamaConfig

    out = work / "tiny"
    if not (out / "done").exists():
        config = LlamaConfig(**TINY)
        config.architectures = ["LlamaForCausalLM"]
        write_random_checkpoint(config, out, device="cpu")
        write_tokenizer(out, TINY["vocab_size"])
        (out / "done").write_text("ok")
    return out


def build_runner(ckpt: Path, device: str, name: str, max_context: int):
    from optimum_nvidia_core.config import EngineConfig
    from optimum_nvidia_core.engine.loading import load
    from optimum_nvidia_core.engine.model_runner import ModelRunner

    options = dict(CONFIGS[name])
    if options.get("use_fp8"):
        options.update(weight_rounding="nearest", calibration_samples=4, calibration_max_length=64)
    # One sequence: one decode bucket, one prefill bucket of 16 tokens (k + 1 <= 9 fit it).
    config = EngineConfig(model=str(ckpt), device=device, max_batch_size=1, max_num_tokens=16,
                          max_seq_len=max_context + 16, dtype="auto", **options)
    loaded = load(config)
    runner = ModelRunner(loaded.model, config, loaded.device, loaded.dtype, loaded.max_seq_len,
                         loaded.eos_token_ids)
    return runner, loaded.vocab_size


def one_sequence(context: int, query: int, block_size: int, vocab: int):
    """A ScheduledBatch of one sequence with `context` tokens, the last `query` of them computed this step."""
    from optimum_nvidia_core.engine.scheduler import ScheduledBatch
    from optimum_nvidia_core.engine.sequence import Sequence
    from optimum_nvidia_core.sampling_params import SamplingParams

    seq = Sequence("bench", [(7 * i) % (vocab - 3) + 3 for i in range(context)], SamplingParams(temperature=0.0))
    seq.block_table = list(range((context + block_size - 1) // block_size))
    seq.num_computed_tokens = context - query
    return ScheduledBatch(seqs=[seq], num_query_tokens=[query], samples=[True])


@torch.inference_mode()
def time_step(runner, context: int, query: int, vocab: int, iters: int) -> dict:
    """Median seconds of forward + LM head on `query` rows + argmax, the step's inputs prepared beforehand."""
    input_ids, positions, attn = runner.prepare(one_sequence(context, query, runner.block_size, vocab))
    graphs = runner.graphs is not None and runner.graphs.can_replay(attn)
    model = runner.model

    def step():
        hidden = runner.graphs.run(input_ids, positions, attn) if graphs else model(input_ids, positions, attn)
        return model.compute_logits(hidden[-query:]).argmax(dim=-1)

    for _ in range(5):
        step()
    samples = []
    for _ in range(iters):
        if runner.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            samples.append(time.perf_counter() - begin)
    return {"seconds": statistics.median(samples), "cuda_graph": graphs}


def proposer_seconds(context: int, k: int) -> float:
    """Host time of one prompt-lookup proposal on a `context`-token sequence (RAG-like: repeats present)."""
    from optimum_nvidia_core.engine.ngram_proposer import NgramProposer

    proposer = NgramProposer(k, prompt_lookup_max=3, prompt_lookup_min=1)
    tokens = [(i * 37) % 500 for i in range(context)]
    begin = time.perf_counter()
    for _ in range(200):
        proposer.propose(tokens)
    return (time.perf_counter() - begin) / 200


def acceptance(path: Path, scenario: str) -> dict[int, dict]:
    """k -> the best (highest tokens per step) n-gram setting spec_acceptance.py measured in `scenario`."""
    if not path.is_file():
        return {}
    best: dict[int, dict] = {}
    for entry in json.loads(path.read_text())["scenarios"][scenario]["settings"]:
        if entry["k"] not in best or entry["tokens_per_step"] > best[entry["k"]]["tokens_per_step"]:
            best[entry["k"]] = entry
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="llama-3-8b", help="a benchmarks/checkpoint.py shape, or 'tiny'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default="fp8kv", help="+-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--contexts", default="256,1024")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--acceptance", default=str(ACCEPTANCE), help="spec_acceptance.py's JSON")
    parser.add_argument("--scenario", default="greedy", help="which of its scenarios' acceptance to apply")
    parser.add_argument("--work-dir", default="/tmp/onv_spec_verify")
    args = parser.parse_args()
    work = Path(args.work_dir)
    os.environ.setdefault("OPTIMUM_NVIDIA_CACHE", str(work / "cache"))
    contexts = [int(c) for c in args.contexts.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    accepted = acceptance(Path(args.acceptance), args.scenario)
    result = {"date": datetime.date.today().isoformat(), "shape": args.shape, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "acceptance_source": f"{args.acceptance} [{args.scenario}]" if accepted else None,
              "tokens_per_step_at_k": {k: accepted[k]["tokens_per_step"] for k in accepted},
              "proposer_host_seconds": {c: proposer_seconds(c, 8) for c in contexts}, "configs": {}}
    begin = time.perf_counter()
    ckpt = checkpoint(args.shape, work, args.device)
    result["checkpoint_write_s"] = time.perf_counter() - begin
    for name in args.configs.split("+"):
        begin = time.perf_counter()
        runner, vocab = build_runner(ckpt, args.device, name, max(contexts))
        entry = result["configs"][name] = {"load_s": time.perf_counter() - begin, "contexts": {}}
        for context in contexts:
            plain = time_step(runner, context, 1, vocab, args.iters)
            row = entry["contexts"][context] = {"plain_step_ms": 1e3 * plain["seconds"],
                                                "plain_cuda_graph": plain["cuda_graph"], "verify": {}}
            for k in ks:
                verify = time_step(runner, context, k + 1, vocab, args.iters)
                ratio = verify["seconds"] / plain["seconds"]
                cell = {"verify_step_ms": 1e3 * verify["seconds"], "cuda_graph": verify["cuda_graph"],
                        "cost_ratio": ratio}
                if k in accepted:
                    tokens = accepted[k]["tokens_per_step"]
                    cell.update(tokens_per_step=tokens, implied_speedup=tokens / ratio)
                row["verify"][k] = cell
                print(name, context, k, cell, flush=True)
        del runner
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
