"""Serving under load, through the public API only (the numbers a LangChain / LlamaIndex app or a server sees):

- ``gil``: output tok/s of N concurrent requests, alone and beside a thread of the application's own that spins in
  pure Python (as retrieval, parsing or a web framework do);
- ``latency``: N concurrent async streams: time to first token and inter-token gap, p50 / p99;
- ``tools``: N concurrent chats with a forced tool call (grammar-constrained) against the same chats unguided (the
  model's tokenizer must be a real one, so JSON tokens exist).

    PYTHONPATH=core:. python benchmarks/serving.py --model DIR [--device cpu|cuda] [--sections gil,latency,tools]
        [--engine-process 0|1] [--concurrency 64] [--prompt-len 128] [--out-len 128] [--out result.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
from pathlib import Path

from optimum_nvidia_core import LLM, SamplingParams

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}


def fixed_length(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)


def random_prompts(count: int, length: int, vocab: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def output_tok_s(llm: LLM, prompts: list[list[int]], out_len: int) -> float:
    outs = llm.generate(prompts, fixed_length(out_len))
    begin = min(o.metrics.arrival_time for o in outs)
    end = max(o.metrics.finished_time for o in outs)
    return sum(len(o.token_ids) for o in outs) / (end - begin)


class Spinner:
    """A thread of the application's own that never blocks: pure Python, holds the interpreter lock whenever
    it can."""

    def __init__(self):
        self._stop = threading.Event()
        self.iterations = 0
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        while not self._stop.is_set():
            total = 0
            for i in range(10_000):
                total += i * i
            self.iterations += 1

    def __enter__(self) -> "Spinner":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench_gil(llm: LLM, concurrency: int, prompt_len: int, out_len: int, rng: random.Random) -> dict:
    output_tok_s(llm, random_prompts(min(concurrency, 4), 16, llm.vocab_size, rng), 4)  # warm-up
    alone = output_tok_s(llm, random_prompts(concurrency, prompt_len, llm.vocab_size, rng), out_len)
    with Spinner() as spinner:
        beside = output_tok_s(llm, random_prompts(concurrency, prompt_len, llm.vocab_size, rng), out_len)
    return {"alone_tok_s": alone, "with_spinning_thread_tok_s": beside, "cost_pct": 100 * (1 - beside / alone),
            "spinner_iterations": spinner.iterations}


async def _timed_stream(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, list[float]]:
    start = time.perf_counter()
    arrivals = []
    async for delta in llm.astream(prompt, params):
        if delta.token_ids:
            arrivals.extend([time.perf_counter()] * len(delta.token_ids))
    return arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:])]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_latency(llm: LLM, concurrency: int, prompt_len: int, out_len: int, rng: random.Random) -> dict:
    prompts = random_prompts(concurrency, prompt_len, llm.vocab_size, rng)

    async def run():
        return await asyncio.gather(*(_timed_stream(llm, p, fixed_length(out_len)) for p in prompts))

    begin = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - begin
    ttfts = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {"streams": concurrency, "prompt_len": prompt_len, "out_len": out_len,
            "output_tok_s": concurrency * out_len / seconds,
            "ttft_ms": {"p50": 1e3 * percentile(ttfts, 0.5), "p99": 1e3 * percentile(ttfts, 0.99)},
            "inter_token_ms": {"p50": 1e3 * percentile(gaps, 0.5), "p99": 1e3 * percentile(gaps, 0.99)}}


def bench_tools(llm: LLM, concurrency: int, out_len: int) -> dict:
    """Forced tool calls against the same chats unguided (fixed output length, so only the grammar differs)."""
    cities = ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth"]
    chats = [[{"role": "user", "content": f"What is the weather in {cities[i % len(cities)]} today? ({i})"}]
             for i in range(concurrency)]

    def run(tools, tool_choice, params) -> tuple[float, int]:
        outs: list = [None] * len(chats)
        errors: list[str] = []

        def one(i):
            try:
                outs[i] = llm.chat(chats[i], params, tools=tools, tool_choice=tool_choice)
            except Exception as exc:  # reported, not hidden: the run fails with it below
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(chats))]
        begin = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - begin
        if errors:
            raise RuntimeError(f"{len(errors)} chats failed; first: {errors[0]}")
        return sum(o.usage.completion_tokens for o in outs) / seconds, sum(bool(o.tool_calls) for o in outs)

    unguided_params = fixed_length(out_len)
    guided_params = SamplingParams(max_tokens=out_len, temperature=0.0)
    run(None, None, fixed_length(4))  # warm-up (and the grammar compiled once below)
    run([WEATHER_TOOL], "any", guided_params)
    unguided, _ = run(None, None, unguided_params)
    guided, calls = run([WEATHER_TOOL], "any", guided_params)
    return {"chats": concurrency, "unguided_tok_s": unguided, "forced_tool_call_tok_s": guided,
            "ratio_pct": 100 * guided / unguided, "calls_parsed": calls}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sections", default="gil,latency")
    parser.add_argument("--engine-process", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--out-len", type=int, default=128)
    parser.add_argument("--engine-options", default="{}", help="JSON: more LLM(...) options")
    parser.add_argument("--out")
    args = parser.parse_args()
    rng = random.Random(0)
    options = dict(device=args.device, engine_process=bool(args.engine_process), **json.loads(args.engine_options))
    llm = LLM(args.model, **options)
    result = {"model": args.model, "options": options}
    for section in args.sections.split(","):
        if section == "gil":
            result["gil"] = bench_gil(llm, args.concurrency, args.prompt_len, args.out_len, rng)
        elif section == "latency":
            result["latency"] = bench_latency(llm, args.concurrency, args.prompt_len, args.out_len, rng)
        elif section == "tools":
            result["tools"] = bench_tools(llm, args.concurrency, args.out_len)
        print(section, json.dumps(result.get(section)), flush=True)
        if args.out:  # after each section: a later failure keeps what was measured
            Path(args.out).write_text(json.dumps(result, indent=1))
    llm.shutdown()


if __name__ == "__main__":
    main()
