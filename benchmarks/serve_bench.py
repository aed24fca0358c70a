"""The HTTP server's cost: the same streaming load through `optimum-nvidia serve` and through the in-process engine.

    PYTHONPATH=core:. python benchmarks/serve_bench.py --shape llama-3-8b --fp8 --concurrency 64,256 --out r.json
    PYTHONPATH=core:. python benchmarks/serve_bench.py --device cpu --concurrency 8 --output-len 16   # CPU smoke
    PYTHONPATH=core:. python benchmarks/serve_bench.py --device cpu --ray-replicas 1,2 --concurrency 16

Load: C concurrent streaming requests of random token-id prompts (``--prompt-len`` in, exactly ``--output-len``
out), sent at once. In-process: ``llm.astream`` on one event loop. Server: the engine in its own `serve` process
and C SSE clients over 127.0.0.1 (/v1/completions with token ids: the same prompts, no chat template), spread over
client processes with a dependency-free HTTP/1.1 reader (asyncio streams: no HTTP client library needed) so the
client is not what is measured. Both legs first run the same load with 4 output tokens (warm-up). Reported per leg:
output tok/s (all tokens / wall time), TTFT and inter-token gap percentiles as the client sees them; then the
server's tok/s as % of in-process and its TTFT p50 minus in-process. ``--ray-replicas`` compares Ray Serve
deployments of N replicas (one CPU thread each on the CPU, one GPU each on GPUs) on the same load instead.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]


# ---- the load ---------------------------------------------------------------------------------------------------
def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def summarize(requests: list[dict], wall: float) -> dict:
    """requests: {"start", "events": [times of deltas with tokens], "tokens"} per request."""
    ttft = sorted(1e3 * (r["events"][0] - r["start"]) for r in requests if r["events"])
    gaps = sorted(1e3 * (b - a) for r in requests for a, b in zip(r["events"], r["events"][1:]))
    tokens = sum(r["tokens"] for r in requests)

    def pct(values: list[float], q: float) -> float | None:
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {"requests": len(requests), "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
            "ttft_ms": {f"p{int(q * 100)}": pct(ttft, q) for q in (0.5, 0.9, 0.99)},
            "itl_ms": {f"p{int(q * 100)}": pct(gaps, q) for q in (0.5, 0.9, 0.99)}}


def overhead(in_process: dict, server: dict) -> dict:
    """The server against the in-process engine on the same load; the issue's targets: >= 90% of the tok/s and
    TTFT p50 within 5 ms."""
    pct = 100 * server["output_tok_s"] / in_process["output_tok_s"]
    delta = server["ttft_ms"]["p50"] - in_process["ttft_ms"]["p50"]
    return {"server_tok_s_pct_of_in_process": pct, "ttft_p50_delta_ms": delta,
            "meets_tok_s_target": pct >= 90.0, "meets_ttft_target": delta <= 5.0}


class Phases:
    """Wall time of each phase of the run (the GPU session has a time budget: this shows where it went)."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self._last, 1)
        self._last = now
        print(f"[{name}: {self.phases[name]} s]", flush=True)


# ---- in-process -------------------------------------------------------------------------------------------------
def run_in_process(llm, prompts: list[list[int]], output_len: int) -> dict:
    from optimum_nvidia_core import SamplingParams

    params = SamplingParams(max_tokens=output_len, min_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def one(prompt: list[int]) -> dict:
        record = {"start": time.perf_counter(), "events": [], "tokens": 0}
        async for delta in llm.astream(prompt, params):
            if delta.token_ids:
                record["events"].append(time.perf_counter())
                record["tokens"] += len(delta.token_ids)
        return record

    async def main() -> tuple[list[dict], float]:
        begin = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        return records, time.perf_counter() - begin

    records, wall = asyncio.run(main())
    return summarize(records, wall)


# ---- over HTTP --------------------------------------------------------------------------------------------------
async def sse_request(host: str, port: int, path: str, body: dict, headers: dict[str, str]) -> dict:
    """POST ``body`` and read the SSE stream; times every event that carries text (chunked transfer decoding)."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    record = {"start": time.perf_counter(), "events": [], "tokens": 0}
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{head}"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    status = (await reader.readline()).split()[1]
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode()}: {await reader.read(2000)}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    buffer = b""
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        buffer += (await reader.readexactly(size + 2))[:-2]
        *events, buffer = buffer.split(b"\n\n")
        now = time.perf_counter()
        for event in events:
            data = event[6:]
            if data == b"[DONE]":
                continue
            chunk = json.loads(data)
            if chunk.get("choices") and (chunk["choices"][0].get("text") or chunk["choices"][0].get("delta")):
                record["events"].append(now)
            if chunk.get("usage"):
                record["tokens"] = chunk["usage"]["completion_tokens"]
    writer.close()
    return record


def _client_process(port: int, prompts: list, output_len: int, model: str, start_at: float, queue) -> None:
    async def main() -> list[dict]:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        body = lambda p: {"model": model, "prompt": p, "max_tokens": output_len, "min_tokens": output_len,  # noqa
                          "ignore_eos": True, "temperature": 0.0, "stream": True,
                          "stream_options": {"include_usage": True}}
        return await asyncio.gather(*(sse_request("127.0.0.1", port, "/v1/completions", body(p), {})
                                      for p in prompts))

    records = asyncio.run(main())
    offset = time.time() - time.perf_counter()  # perf_counter is per process: report wall-clock times
    queue.put([{**r, "start": r["start"] + offset, "events": [t + offset for t in r["events"]]} for r in records])


def run_over_http(port: int, prompts: list[list[int]], output_len: int, model: str, processes: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 3.0  # every client process is up and waiting by then
    shares = [prompts[i::processes] for i in range(processes)]
    workers = [ctx.Process(target=_client_process, args=(port, s, output_len, model, start_at, queue))
               for s in shares if s]
    for w in workers:
        w.start()
    records = [r for _ in workers for r in queue.get(timeout=1800)]
    for w in workers:
        w.join()
    wall = max(r["events"][-1] for r in records if r["events"]) - min(r["start"] for r in records)
    return summarize(records, wall)


def start_server(model: str, options: dict, port: int, env: dict) -> subprocess.Popen:
    code = ("import json, sys; from optimum_nvidia_core.server.launcher import serve; "
            f"serve({model!r}, port={port}, log_level='warning', **json.loads(sys.argv[1]))")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(options)], env=env)
    wait_healthy(port, proc)
    return proc


def wait_healthy(port: int, proc: subprocess.Popen | None = None, timeout: float = 900) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- Ray Serve --------------------------------------------------------------------------------------------------
def run_ray(model: str, options: dict, replicas: list[int], prompts_of: dict, output_len: int, processes: int,
            gpu: bool) -> dict:
    import ray
    from ray import serve

    from optimum_nvidia_core.server.ray_serve import build_app

    results = {}
    ray.init(num_cpus=max(replicas) + 2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for n in replicas:
            per_replica = dict(options) if gpu else {**options, "torch_threads": 1}
            serve.run(build_app(model, replicas=n, gpus_per_replica=1 if gpu else 0, cpus_per_replica=1,
                                **per_replica), route_prefix="/")
            wait_healthy(port)
            for concurrency, prompts in prompts_of.items():
                run_over_http(port, prompts[:max(2, n)], 4, model, 1)  # warm-up: every replica compiles/allocates
                results[f"{n}_replicas@{concurrency}"] = run_over_http(port, prompts, output_len, model, processes)
                print(n, "replicas", concurrency, results[f"{n}_replicas@{concurrency}"], flush=True)
            serve.delete("default")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


# ---- main -------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint or engine directory, or a hub id (default: SmolLM2 on the CPU)")
    parser.add_argument("--shape", help="write and use a random-weight checkpoint of this shape (GPU), e.g. llama-3-8b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", default="64,256")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--fp8", action="store_true", help="FP8 weights + FP8 KV cache (GPU)")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--client-processes", type=int, default=0, help="default: one per 32 streams, at most 8")
    parser.add_argument("--ray-replicas", help="compare Ray Serve deployments of these replica counts, e.g. 1,2")
    parser.add_argument("--work-dir", default="/tmp/onv_bench",
                        help="checkpoints and engines (the default is gpu_session.sh's: its 8B checkpoint is reused)")
    parser.add_argument("--out", default=None, help="write the results (json) here")
    args = parser.parse_args()
    import torch

    from optimum_nvidia_core.hub import DEFAULT_MODEL

    gpu = torch.cuda.is_available() and args.device != "cpu"
    model, vocab = args.model or DEFAULT_MODEL, 49152
    clock = Phases()
    if args.shape:
        from checkpoint import SHAPES, write_checkpoint

        model, vocab = str(write_checkpoint(args.shape, Path(args.work_dir) / args.shape)), SHAPES[args.shape]["vocab_size"]
        clock.done("checkpoint")
        if gpu:
            torch.cuda.empty_cache()  # the weights were drawn on the GPU: give the engines that memory back
    concurrency = [int(c) for c in args.concurrency.split(",")]
    options = {"device": args.device, "max_batch_size": max(args.max_batch_size, max(concurrency))}
    options["max_num_tokens"] = max(2048, options["max_batch_size"])
    if args.fp8:
        options.update(use_fp8=True, kv_cache_dtype="fp8", weight_rounding="nearest")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "core"), str(REPO),
                                                                 os.environ.get("PYTHONPATH")) if p)}
    if args.shape:  # engines of random checkpoints are built in this run, not kept in the user's cache
        os.environ.setdefault("OPTIMUM_NVIDIA_CACHE", str(Path(args.work_dir) / "cache"))
        env["OPTIMUM_NVIDIA_CACHE"] = os.environ["OPTIMUM_NVIDIA_CACHE"]
    prompts_of = {c: make_prompts(c, args.prompt_len, vocab, seed=c) for c in concurrency}
    processes = lambda c: args.client_processes or max(1, min(8, c // 32))  # noqa: E731
    result = {"device": torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)", "model": model,
              "shape": args.shape, "options": options, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "date": time.strftime("%Y-%m-%d")}

    if args.ray_replicas:
        replicas = [int(n) for n in args.ray_replicas.split(",")]
        result["ray"] = run_ray(model, options, replicas, prompts_of, args.output_len, 1, gpu)
        clock.done("ray")
        for c in concurrency:
            one, many = result["ray"].get(f"{replicas[0]}_replicas@{c}"), result["ray"].get(f"{replicas[-1]}_replicas@{c}")
            if one and many:
                result["ray"][f"speedup@{c}"] = many["output_tok_s"] / one["output_tok_s"]
    else:
        from optimum_nvidia_core import LLM

        llm = LLM(model, **options)
        clock.done("in_process_engine_build_and_load")
        for c in concurrency:  # warm-up: every batch size of the load once (GEMM tuning, first allocations)
            run_in_process(llm, prompts_of[c], 4)
        result["in_process"] = {c: run_in_process(llm, prompts_of[c], args.output_len) for c in concurrency}
        clock.done("in_process_load")
        print("in-process", result["in_process"], flush=True)
        llm.shutdown()
        del llm
        gc.collect()  # the server process sizes its KV cache from the memory left free here
        if gpu:
            torch.cuda.empty_cache()
        port = free_port()
        server = start_server(model, options, port, env)
        clock.done("server_start")
        try:
            for c in concurrency:  # the same warm-up as in-process
                run_over_http(port, prompts_of[c], 4, model, processes(c))
            result["server"] = {c: run_over_http(port, prompts_of[c], args.output_len, model, processes(c))
                                for c in concurrency}
        finally:
            stop(server)
        clock.done("server_load")
        print("server", result["server"], flush=True)
        result["overhead"] = {c: overhead(result["in_process"][c], result["server"][c]) for c in concurrency}
    result["phases_s"] = clock.phases
    print(json.dumps({k: v for k, v in result.items() if k in ("overhead", "ray", "phases_s")}, indent=1), flush=True)
    for target in [args.out] + ([str(Path(os.environ["OUT"]) / "serve_bench.json")] if os.environ.get("OUT") else []):
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
