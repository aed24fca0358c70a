"""FP8 build benchmark (issue 19) on one GPU, Llama-3-8B shape: build time (GPTQ and nearest rounding), a GPTQ build
under a GPU memory cap smaller than the bf16 model (torch's per-process memory fraction = --cap-gib, 12 GiB), peak
memory, and a cached start part by part. The 70B-shape FP8 model served on one GPU: benchmarks/fp8_70b.py.

    PYTHONPATH=core:. python benchmarks/build_bench.py --out benchmarks/results/<date>-NVIDIA_H200-build.json

Each measured step runs in its own Python process (fresh CUDA context, nothing verified or cached in memory, the
memory cap set before the first allocation), reporting one JSON line; this parent writes them to --out after each
step, so a time-out still leaves the steps done. Every figure is measured in the run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEP_TIMEOUT_S = {"build": 300, "load": 200}  # seconds per step


# ---- steps (each in a child process) -------------------------------------------------------------------------------
def step_build(ckpt: str, cache: str, rounding: str, cap_gib: float | None) -> dict:
    """Build the default FP8 engine (GPTQ or nearest rounding) into ``cache``; under ``cap_gib`` of GPU memory, first
    show that the bf16 model itself does not fit, then build and load the FP8 engine under the same cap."""
    import torch

    from optimum_nvidia_core.build import get_or_build, load_engine
    from optimum_nvidia_core.config import EngineConfig

    os.environ["OPTIMUM_NVIDIA_CACHE"] = str(Path(cache).parent)  # engines and source fingerprints both in there
    result = {"rounding": rounding, "cap_GiB": cap_gib}
    if cap_gib:
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        result["bf16_model_loads_under_cap"] = _bf16_fits(ckpt)
    torch.cuda.reset_peak_memory_stats()
    config = EngineConfig(model=ckpt, use_fp8=True, weight_rounding=rounding, device="cuda")
    begin = time.perf_counter()
    engine = get_or_build(Path(ckpt), config, cache_root=Path(cache))
    torch.cuda.synchronize()
    result["build_s"] = time.perf_counter() - begin
    result["build_peak_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    result["build_peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    result["engine_GB"] = sum(p.stat().st_size for p in engine.iterdir()) / 1e9
    if cap_gib:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        model = load_engine(engine, torch.bfloat16, "cuda")
        torch.cuda.synchronize()
        result["load_under_cap_s"] = time.perf_counter() - begin
        result["loaded_peak_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        del model
    return result


def _bf16_fits(ckpt: str) -> dict:
    import torch

    from optimum_nvidia_core.models.loader import load_model

    try:
        load_model(Path(ckpt), torch.bfloat16, "cuda")
        fits = {"fits": True}
    except torch.OutOfMemoryError as error:
        fits = {"fits": False, "error": str(error).splitlines()[0][:200]}
    _free_memory("cuda")  # whatever was allocated is garbage now
    return fits


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free_memory(device: str) -> None:
    import gc

    import torch

    gc.collect()  # a failed load's tensors may sit in reference cycles (the exception's frames)
    if device == "cuda":
        torch.cuda.empty_cache()


def step_load(ckpt: str, cache: str, rounding: str, device: str = "cuda", options: dict | None = None) -> dict:
    """A cached start in a fresh process, part by part, then end to end.

    Parts: imports; finding the engine (the source's fingerprint, remembered by the build: build/source_fingerprint.py;
    the calibration hash; verification, trusting the stat stamps of the build's full check: build/engine_dir.py);
    what hashing every engine file would cost instead; the engine's layout on the meta device and its weights onto
    the GPU; the KV cache; the CUDA graphs per family (the FP8 GEMM tuner's first calls run in their warm-ups). Then ``LLM(...)`` (engine core process included) up to a first
    token, timed end to end: the target's figure. ``device="cpu"`` and ``options`` (more EngineConfig fields): the
    CPU smoke run of tests/unit/test_build_bench.py (no graphs there)."""
    begin = time.perf_counter()
    import torch

    from optimum_nvidia_core import LLM, SamplingParams
    from optimum_nvidia_core.build import engine_dir, get_or_build, load_engine
    from optimum_nvidia_core.config import EngineConfig
    from optimum_nvidia_core.devices import gpu_memory
    from optimum_nvidia_core.engine.model_runner import ModelRunner

    if device == "cuda":
        torch.cuda.init()
    result = {"imports_and_cuda_init_s": time.perf_counter() - begin}
    os.environ["OPTIMUM_NVIDIA_CACHE"] = str(Path(cache).parent)  # as the build step: the engine cache is cache
    options = {"use_fp8": True, "weight_rounding": rounding, "device": device, **(options or {})}
    config = EngineConfig(model=ckpt, **options)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    begin = time.perf_counter()
    engine = get_or_build(Path(ckpt), config, cache_root=Path(cache), build_fn=_refuse_build)
    result["find_engine_s"] = time.perf_counter() - begin
    result["stamps_trusted"] = (engine / engine_dir.STAMP_NAME).is_file()
    begin = time.perf_counter()
    engine_dir.verify_engine_dir(engine, full=True)
    result["full_hash_s"] = time.perf_counter() - begin  # what finding the engine cost before the stamps
    result["engine_GB"] = sum(p.stat().st_size for p in engine.iterdir()) / 1e9
    parts: dict = {}
    model = load_engine(engine, dtype, device, verify=False, timings=parts)
    begin = time.perf_counter()
    model.fuse_fp8_input_quantization()
    parts["fuse_s"] = time.perf_counter() - begin
    result.update({f"load_{k}": v for k, v in parts.items()})
    result["weights_GBps"] = result["engine_GB"] / parts["weights_s"]
    result["weights_load_file_s"] = _time_load_file(engine, device)  # safetensors' own reader, for comparison
    result["cached_load_s"] = result["find_engine_s"] + sum(parts.values())  # the "cached load"
    max_seq_len = min(config.max_seq_len or model.config.max_position_embeddings,
                      model.config.max_position_embeddings)  # as engine/loading.py resolves it
    limits = config.with_limits(gpu_memory(torch.device(device)))
    begin = time.perf_counter()
    runner = ModelRunner(model, limits.model_copy(update={"enforce_eager": True}), torch.device(device), dtype,
                         max_seq_len, [2])
    _sync(device)
    result["kv_cache_s"] = time.perf_counter() - begin
    result["kv_cache_tokens"] = runner.num_blocks * limits.block_size
    runner.config = limits  # the graphs the engine captures with these limits
    begin = time.perf_counter()
    graphs = runner._maybe_graphs()
    result["cuda_graphs_s"] = time.perf_counter() - begin
    result["cuda_graphs_by_family_s"] = dict(graphs.capture_seconds) if graphs else None
    result["cuda_graphs_count"] = {f: len(g) for f, g in graphs.families.items()} if graphs else None
    result["limits"] = {"max_batch_size": limits.max_batch_size, "max_num_tokens": limits.max_num_tokens}
    del runner, graphs, model
    _free_memory(device)
    begin = time.perf_counter()
    llm = LLM(ckpt, **options)
    result["llm_start_s"] = time.perf_counter() - begin
    llm.generate([[5] * 8], SamplingParams(max_tokens=2, temperature=0.0))
    result["llm_ready_s"] = time.perf_counter() - begin  # end to end: process, load, KV cache, graphs, first token
    llm.shutdown()
    return result


def _time_load_file(engine: Path, device: str) -> float:
    """Seconds safetensors.torch.load_file takes to put the engine's weight files on ``device`` (then freed)."""
    from safetensors.torch import load_file

    from optimum_nvidia_core.build.builder import engine_weight_files

    begin = time.perf_counter()
    for file in engine_weight_files(engine):
        state = load_file(str(file), device=device)
        _sync(device)
        del state
    seconds = time.perf_counter() - begin
    _free_memory(device)
    return seconds


def _refuse_build(*_args):
    raise RuntimeError("the engine was not in the cache: the build step failed or used other options")


STEPS = {"build": step_build, "load": step_load}


# ---- the parent -----------------------------------------------------------------------------------------------------
def run_step(name: str, **kwargs) -> dict:
    """Run one step in a child process; its last stdout line is its JSON result."""
    command = [sys.executable, __file__, "--child", json.dumps({"step": name, **kwargs})]
    begin = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=STEP_TIMEOUT_S[name],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "core"),
                                                                                str(HERE.parent), str(HERE)])})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {STEP_TIMEOUT_S[name]} s", "wall_s": time.perf_counter() - begin}
    sys.stderr.write(done.stderr[-3000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr or done.stdout)[-1500:], "wall_s": time.perf_counter() - begin}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - begin}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="the JSON results file (required)")
    parser.add_argument("--work-dir", default="/tmp/onv_build_bench")
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--cap-gib", type=float, default=12.0, help="GPU memory cap of the capped GPTQ build")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: nearest, load")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        measured = STEPS[spec.pop("step")](**spec)
        import torch

        print(json.dumps({**measured, "gpu": torch.cuda.get_device_name()}, default=str), flush=True)
        return
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # No CUDA in this parent: its context would take GPU memory from the steps. Each step reports the GPU.
    result = {"date": time.strftime("%Y-%m-%d"), "shape": args.shape}

    def save(key: str, value: dict) -> None:
        result[key] = value
        print(key, json.dumps(value, default=str), flush=True)
        out.write_text(json.dumps(result, indent=1, default=str))

    sys.path.insert(0, str(HERE))
    from checkpoint import write_checkpoint

    work = Path(args.work_dir)
    begin = time.perf_counter()
    ckpt = str(write_checkpoint(args.shape, work / args.shape))
    save("checkpoint", {"dir": ckpt, "write_s": time.perf_counter() - begin})
    skip = set(filter(None, args.skip.split(",")))
    gptq_cache = str(work / "cache-gptq" / "engines")  # <OPTIMUM_NVIDIA_CACHE>/engines
    save("build_gptq_capped", run_step("build", ckpt=ckpt, cache=gptq_cache, rounding="gptq", cap_gib=args.cap_gib))
    if "error" in result["build_gptq_capped"]:  # still measure the build time, without the cap
        save("build_gptq", run_step("build", ckpt=ckpt, cache=gptq_cache, rounding="gptq", cap_gib=None))
    if "load" not in skip:
        save("cached_load_gptq", run_step("load", ckpt=ckpt, cache=gptq_cache, rounding="gptq"))
    if "nearest" not in skip:
        save("build_nearest", run_step("build", ckpt=ckpt, cache=str(work / "cache-nearest" / "engines"),
                                       rounding="nearest", cap_gib=None))


if __name__ == "__main__":
    main()
