"""A Llama-3-70B-shape FP8 model served on one GPU (issue 19, item 4): a random checkpoint written straight in FP8 in
the compressed-tensors layout (per-channel weight scales, static activation scales, FP8 KV-cache scales), loaded and
served through ``LLM``: decode tok/s at batch 1, 128/128 output tok/s at 64 concurrent, peak GPU memory, the tokens
of FP8 KV cache the engine had room for, and the seconds of every phase.

    PYTHONPATH=core:. python benchmarks/fp8_70b.py --out benchmarks/results/<date>-NVIDIA_H200-fp8-70b.json
    PYTHONPATH=core:. python benchmarks/fp8_70b.py --shape smoke --device cpu --out /tmp/fp8_70b_smoke.json

Storage: the 70B checkpoint is ~73 GB and no bf16 copy of it is ever made (the writer quantizes each tensor on the
device as it draws it, and writes each shard as soon as it is full). One H200 machine has 64 GiB of disk and
128 GiB of RAM (/dev/shm: half of it), so neither may hold it alone: each shard goes where there is room when it is
written, checked then (memory-backed /dev/shm first while RAM to spare remains, since it writes and reads at memory
speed, then the disk), and is linked into one checkpoint directory on the disk. Too little room in all is an error
before anything is written. Every file this script wrote is removed at the end, also after an error or SIGTERM
(``--keep`` leaves them, for a later ``--checkpoint DIR`` run; files of a given ``--checkpoint`` are never removed).
Results are written to ``--out`` after every phase; past ``--time-limit-s`` the script stops itself (SIGTERM) so that
it still removes its files inside a 10-minute GPU call.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

GiB = 2**30
DISK_RESERVE = 4 * GiB  # left free on the disk
RAM_RESERVE = 24 * GiB  # RAM left to everything else when /dev/shm takes shards (the engine, the page cache)
SHM_RESERVE = 1 * GiB
SMOKE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=False)
TARGETS = {"decode_tok_s_bs1": 50.0, "kv_cache_tokens": 100_000}


def model_config(shape: str, layers: int | None):
    from checkpoint import SHAPES, llama_config

    if shape == "smoke":
        from transformers import LlamaConfig

        config = LlamaConfig(**SMOKE_SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        config.architectures = ["LlamaForCausalLM"]
    elif shape in SHAPES:
        config = llama_config(shape)
    else:
        raise SystemExit(f"unknown --shape {shape!r}: one of {sorted(SHAPES) + ['smoke']}")
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def available_ram() -> int:
    """MemAvailable of /proc/meminfo in bytes (what can be taken without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Storage:
    """Where each shard goes: the first directory, in order of preference, with room for it now."""

    def __init__(self, dirs: list[tuple[str, Path]]):
        self.dirs = dirs  # (kind "shm" | "disk", directory)
        self.written: dict[str, int] = {kind: 0 for kind, _ in dirs}

    def room(self, kind: str, path: Path) -> int:
        free = shutil.disk_usage(path).free
        if kind == "shm":  # tmpfs pages are RAM: leave enough of it for the rest of the machine
            return min(free - SHM_RESERVE, available_ram() - RAM_RESERVE)
        return free - DISK_RESERVE

    def check(self, shard_bytes: list[int]) -> dict[str, int]:
        """Raise before writing anything unless every shard fits in the room there is now (first fit)."""
        room = {kind: self.room(kind, path) for kind, path in self.dirs}
        for nbytes in shard_bytes:
            kind = next((k for k, _ in self.dirs if room[k] >= nbytes), None)
            if kind is None:
                raise SystemExit(
                    f"not enough room for the checkpoint ({sum(shard_bytes) / 1e9:.1f} GB): free after reserves "
                    + ", ".join(f"{k} {p} {self.room(k, p) / 1e9:.1f} GB" for k, p in self.dirs)
                    + "; free some space, or pass --disk-dir / --shm-dir on bigger file systems")
            room[kind] -= nbytes
        return room

    def __call__(self, file: str, nbytes: int) -> Path:
        for kind, path in self.dirs:
            if self.room(kind, path) >= nbytes:
                self.written[kind] += nbytes
                return path
        raise OSError(f"no room left for {file} ({nbytes / 1e9:.1f} GB) in {[str(p) for _, p in self.dirs]}")


def write_checkpoint(config, args, made: list[Path], result: dict) -> Path:
    """The random FP8 checkpoint in a new directory under --disk-dir, shards there or under --shm-dir."""
    import torch

    from checkpoint import write_tokenizer
    from fp8_checkpoint_writer import plan_shards, write_fp8_checkpoint

    disk = Path(tempfile.mkdtemp(prefix="onv-fp8-70b-", dir=args.disk_dir))
    made.append(disk)
    dirs = [("disk", disk)]
    if args.shm_dir and Path(args.shm_dir).is_dir():
        shm = Path(tempfile.mkdtemp(prefix="onv-fp8-70b-", dir=args.shm_dir))
        made.append(shm)
        dirs = [("shm", shm), ("disk", disk)] if args.prefer == "shm" else [("disk", disk), ("shm", shm)]
    storage = Storage(dirs)
    shard_bytes = [nbytes for _, nbytes in plan_shards(config, torch.bfloat16, args.shard_bytes)]
    result["checkpoint_GB"] = sum(shard_bytes) / 1e9
    result["room_GB_before"] = {k: storage.room(k, p) / 1e9 for k, p in dirs}
    storage.check(shard_bytes)
    begin = time.perf_counter()
    write_fp8_checkpoint(config, disk, "compressed-tensors", "channel", static_activations=True, kv_cache=True,
                         device=args.device, max_shard_bytes=args.shard_bytes, place=storage)
    write_tokenizer(disk, config.vocab_size)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the engine core sizes its KV cache by the free memory: give back the writer's
    result["written_GB"] = {k: v / 1e9 for k, v in storage.written.items()}
    result["write_GBps"] = sum(shard_bytes) / 1e9 / (time.perf_counter() - begin)
    return disk


def serve(ckpt: Path, args, result: dict, save) -> None:
    from optimum_nvidia_core import LLM, SamplingParams

    phases = result["phases_s"]
    begin = time.perf_counter()
    llm = LLM(str(ckpt), device=args.device, kv_cache_dtype="fp8", max_batch_size=args.concurrency,
              block_size=args.block_size)
    phases["engine_start"] = time.perf_counter() - begin  # load + KV cache + CUDA graphs (engine core process)
    try:
        stats = llm.stats()
        result["kv_cache_tokens"] = stats["total_blocks"] * args.block_size
        vocab = llm.vocab_size
        rng = random.Random(0)

        def run(count: int, prompt: int, out: int) -> tuple[list, float]:
            prompts = [[rng.randrange(3, vocab) for _ in range(prompt)] for _ in range(count)]
            outs = llm.generate(prompts, SamplingParams(max_tokens=out, min_tokens=out, temperature=0.0))
            seconds = max(o.metrics.finished_time for o in outs) - min(o.metrics.arrival_time for o in outs)
            return outs, seconds

        timed(phases, "warm_up", lambda: run(2, 64, 8))
        save()
        (out,), _ = timed(phases, "decode_bs1", lambda: run(1, args.prompt_len, args.decode_tokens))
        result["decode_tok_s_bs1"] = (args.decode_tokens - 1) / (out.metrics.finished_time
                                                                   - out.metrics.first_token_time)
        save()
        _, seconds = timed(phases, f"concurrent_{args.concurrency}",
                           lambda: run(args.concurrency, args.prompt_len, args.output_len))
        result[f"output_tok_s_{args.concurrency}x{args.prompt_len}_{args.output_len}"] = (
            args.concurrency * args.output_len / seconds)
        stats = llm.stats()
        result["gpu_peak_allocated_GiB"] = stats.get("gpu_peak_memory_bytes", 0) / GiB  # the engine core's
        result["device_memory"] = device_memory(args.device)
    finally:
        llm.shutdown()


def timed(phases: dict, name: str, fn):
    begin = time.perf_counter()
    value = fn()
    phases[name] = time.perf_counter() - begin
    return value


def device_memory(device: str) -> dict | None:
    """Memory in use on the whole GPU (every process: the engine core's weights, KV cache, graphs, activations)."""
    if device != "cuda":
        return None
    import torch

    free, total = torch.cuda.mem_get_info()
    return {"used_GiB": (total - free) / GiB, "total_GiB": total / GiB, "gpu": torch.cuda.get_device_name()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON results file")
    parser.add_argument("--shape", default="llama-3-70b", help="a shape of benchmarks/checkpoint.py, or 'smoke'")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="holds the checkpoint directory")
    parser.add_argument("--shm-dir", default="/dev/shm", help="memory-backed storage for shards ('' for none)")
    parser.add_argument("--prefer", choices=["shm", "disk"], default="shm", help="where shards go first")
    parser.add_argument("--shard-bytes", type=int, default=4 * GiB)
    parser.add_argument("--checkpoint", default=None, help="serve this existing checkpoint (not written, not removed)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint written (its path is reported)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=256, help="output tokens of the batch-1 decode")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--time-limit-s", type=float, default=570.0,
                        help="stop (results so far kept, files removed) after this long: a GPU call ends at 600 s")
    args = parser.parse_args()
    sys.path[:0] = [str(HERE.parent / "core"), str(HERE.parent), str(HERE)]  # the package, benchmarks.*, checkpoint
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time-out's SIGTERM still cleans up (finally)
    watchdog = threading.Timer(args.time_limit_s, os.kill, (os.getpid(), signal.SIGTERM))
    watchdog.daemon = True
    watchdog.start()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "shape": args.shape,
              "layout": "compressed-tensors FP8, per-channel weights, static activations, FP8 KV scales",
              "phases_s": {}, "targets": TARGETS}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1, default=str))

    made: list[Path] = []
    try:
        config = model_config(args.shape, args.layers)
        result["layers"] = config.num_hidden_layers
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            ckpt = timed(result["phases_s"], "write_checkpoint", lambda: write_checkpoint(config, args, made, result))
            result["checkpoint_dir"] = str(ckpt)
        save()
        serve(ckpt, args, result, save)
        result["met"] = {k: result.get(k, 0) >= v for k, v in TARGETS.items()}
    except BaseException as error:
        result["error"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        if made and not args.keep:
            begin = time.perf_counter()
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
            result["phases_s"]["clean_up"] = time.perf_counter() - begin
            result["removed"] = [str(p) for p in made]
        save()
        print(json.dumps(result, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
