"""``optimum-nvidia``: build an engine, chat with a model, benchmark it, inspect the machine and the cache.

    optimum-nvidia build MODEL [--fp8 | --quantization int4 [--int4-method awq]] [--kv-cache-dtype fp8]
                         [--calibration FILE] [--output DIR]
    optimum-nvidia chat MODEL            # one user turn per input line; /reset clears the history, /exit quits
    optimum-nvidia serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]   # OpenAI-compatible HTTP
    optimum-nvidia bench [--model MODEL] # benchmarks/bench.py when present, else a built-in throughput run
    optimum-nvidia info                  # GPU, FP8 support, cache entries and their sizes
    optimum-nvidia cache clear           # delete the cache's entries ($OPTIMUM_NVIDIA_CACHE); other files stay

Only the public core API is used here (LLM, SamplingParams, hub); model loading happens inside the command.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .cache import cache_entries, foreign_paths, remove_entries
from .cache_dir import cache_root
from .hub import DEFAULT_MODEL

REPO_ROOT = Path(__file__).resolve().parents[2]  # core/optimum_nvidia_core/cli.py -> the source checkout
BENCH_SCRIPT = REPO_ROOT / "benchmarks" / "bench.py"
BENCH_TOPICS = ("a lighthouse", "the ocean", "a robot", "a city at night", "a forest", "a violin", "the moon", "rain")


# ------------------------------------------------------------------------------------------------ commands


def cmd_build(args: argparse.Namespace) -> int:
    """Build (or reuse) the engine for MODEL; with --output, also write it to DIR for ``LLM(DIR)``."""
    from .llm import LLM

    options = _engine_options(args)
    options.update(kv_cache_dtype=args.kv_cache_dtype, calibration_samples=args.calibration_samples,
                   calibration_max_length=args.calibration_max_length)
    if args.calibration:
        options["calibration_dataset"] = read_calibration_file(Path(args.calibration))
    started = time.perf_counter()
    llm = LLM(args.model, **options)
    print(f"Engine ready for {llm.model_name} (quantization={llm.config.quantization}, "
          f"kv_cache_dtype={args.kv_cache_dtype}) "
          f"in {time.perf_counter() - started:.1f} s")
    if args.output:
        print(f"Engine written to {llm.save(args.output)}")
    else:
        print(f"Loaded from {_engine_location(llm)}; pass --output DIR to write a standalone engine directory")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A terminal chat: streams each answer and keeps the conversation as context for the next turn."""
    from .llm import LLM
    from .sampling_params import SamplingParams

    llm = LLM(args.model, **_engine_options(args))
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {llm.model_name}. /reset clears the history, /exit (or Ctrl-D) quits.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if text == "/reset":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        if text:
            history.append({"role": "user", "content": text})
            _chat_turn(llm, system, history, params, args)


def _chat_turn(llm: Any, system: list[dict], history: list[dict], params: Any, args: argparse.Namespace) -> None:
    """Answer the last user message of ``history`` and append the answer. While the conversation does not fit the
    context, the oldest turn is dropped (with a notice); a message that does not fit alone, or that the model
    refuses, is reported and left out. Either way the chat goes on."""
    from .request_checks import ContextLengthError

    while True:
        try:
            answer = _stream_answer(llm, system + history, params, args)
        except ContextLengthError as error:
            if len(history) > 2:  # an older (user, assistant) turn to give up
                del history[:2]
                print("(the conversation outgrew the context: dropped the oldest turn)", file=sys.stderr, flush=True)
                continue
            history.pop()
            print(f"error: {error}. That message was not sent: send a shorter one", file=sys.stderr, flush=True)
            return
        except ValueError as error:  # nothing was generated (e.g. invalid text): the conversation stays as it was
            history.pop()
            print(f"error: {error}", file=sys.stderr, flush=True)
            return
        history.append({"role": "assistant", "content": answer})
        return


def _stream_answer(llm: Any, messages: list[dict], params: Any, args: argparse.Namespace) -> str:
    parts: list[str] = []
    last = None
    for delta in llm.chat_stream(messages, params):
        print(delta.text, end="", flush=True)
        parts.append(delta.text)
        last = delta
    print(flush=True)
    if args.verbose and last is not None and last.usage is not None:
        rate = last.metrics.decode_tokens_per_s(last.usage.completion_tokens) if last.metrics else None
        print(f"[{last.usage.prompt_tokens} prompt tokens, {last.usage.completion_tokens} new tokens"
              + (f", {rate:.1f} tok/s]" if rate else "]"), file=sys.stderr, flush=True)
    return "".join(parts)


def cmd_serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)."""
    try:
        from .server.launcher import serve
    except ImportError as error:
        raise RuntimeError(f"serve needs the server extra ({error.name} is missing); "
                           "pip install 'optimum-nvidia-langchain-llamaindex[server]'") from None
    options = _engine_options(args)
    options.update(kv_cache_dtype=args.kv_cache_dtype, max_batch_size=args.max_batch_size,
                   max_num_tokens=args.max_num_tokens)
    if args.max_seq_len:
        options["max_seq_len"] = args.max_seq_len
    api_key = args.api_key or os.environ.get("OPTIMUM_NVIDIA_API_KEY")
    serve(args.model, host=args.host, port=args.port, api_key=api_key, served_model_name=args.served_model_name,
          shutdown_timeout=args.shutdown_timeout, **options)
    return 0


def cmd_bench(args: argparse.Namespace, script_args: list[str]) -> int:
    """benchmarks/bench.py (a GPU benchmark; extra arguments go to it) when present and a GPU is there, or the
    script given with --script; else a built-in throughput run."""
    import torch

    script = Path(args.script) if args.script else BENCH_SCRIPT
    wants_script = args.script is not None or torch.cuda.is_available()
    if not args.builtin and args.model is None and wants_script and script.is_file():
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "core"), str(REPO_ROOT),
                                                        env.get("PYTHONPATH")) if p)
        print(f"Running {script} {' '.join(script_args)}", flush=True)
        return subprocess.run([sys.executable, str(script), *script_args], env=env).returncode
    if script_args:
        raise ValueError(f"unrecognized arguments {script_args} for the built-in benchmark; see `bench --help`")
    return _builtin_bench(args)


def _builtin_bench(args: argparse.Namespace) -> int:
    from .llm import LLM
    from .sampling_params import SamplingParams

    model = args.model or DEFAULT_MODEL
    llm = LLM(model, max_batch_size=max(args.num_prompts, 1), **_engine_options(args))
    prompts = [f"Write a short story about {BENCH_TOPICS[i % len(BENCH_TOPICS)]} (number {i})."
               for i in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up: first-call costs
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)  # one in-flight batch
    elapsed = time.perf_counter() - started
    new = sum(len(c.token_ids) for out in outputs for c in out.choices)
    prompt = sum(out.usage.prompt_tokens for out in outputs if out.usage)
    ttfts = [out.metrics.time_to_first_token for out in outputs if out.metrics and out.metrics.time_to_first_token]
    ttft = f", median time to first token {1000 * statistics.median(ttfts):.0f} ms" if ttfts else ""
    print(f"{llm.model_name}: {len(prompts)} requests, {prompt} prompt + {new} output tokens in {elapsed:.2f} s")
    print(f"throughput: {new / elapsed:.1f} output tok/s, {(prompt + new) / elapsed:.1f} total tok/s{ttft}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, GPUs and their FP8 support, and what the cache holds."""
    import torch
    import transformers

    from . import __version__

    print(f"optimum-nvidia-core {__version__} (python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {transformers.__version__})")
    if not torch.cuda.is_available():
        print("GPU: none (CUDA is not available); the engine runs on the CPU")
        print("FP8: emulated on the CPU (same e4m3 rounding as the GPU path, for testing; not fast)")
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        major, minor = props.major, props.minor
        fp8 = "supported" if (major, minor) >= (8, 9) else "not supported (needs compute capability 8.9+)"
        print(f"GPU {index}: {props.name}, compute capability {major}.{minor}, "
              f"{props.total_memory / 2**30:.1f} GiB; FP8: {fp8}")
    root = cache_root()
    entries = cache_entries(root)
    total = sum(entry.size for entry in entries)
    print(f"Cache: {root} ({len(entries)} entries, {human_size(total)})")
    for entry in entries:
        print(f"  {human_size(entry.size):>10}  {entry.path.relative_to(root)}  {entry.kind}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``cache clear``: delete the cache's entries (engines, converted models, leftovers of killed builds). Only
    what this package wrote is touched, recognized by its layout and manifest: other files under the cache root
    are left alone."""
    root = cache_root()
    removed, busy = remove_entries(cache_entries(root))
    print(f"Removed {len(removed)} cache entries ({human_size(sum(e.size for e in removed))}) from {root}")
    for entry in busy:
        print(f"Skipped {entry.path}: a build running now holds it; run `cache clear` again once it is done")
    others = foreign_paths(root)
    if others:
        names = ", ".join(str(p.relative_to(root)) for p in others[:5]) + (", ..." if len(others) > 5 else "")
        print(f"Left alone {len(others)} path(s) that are not cache entries: {names}")
    return 0


# ------------------------------------------------------------------------------------------------- helpers


def human_size(num_bytes: int) -> str:
    size, unit = float(num_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}"


def read_calibration_file(path: Path) -> list[str]:
    """Calibration texts: .jsonl (a string or {"text": ...} per line), .json (a list of those), else one per line."""
    if not path.is_file():
        raise ValueError(f"calibration file {path} does not exist; pass a text, .json or .jsonl file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix == ".json":
        items = json.loads(raw)
    else:
        items = [line for line in raw.splitlines() if line.strip()]
    texts = [item["text"] if isinstance(item, dict) else item for item in items]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError(f"calibration file {path} must hold non-empty texts (one per line, or 'text' fields)")
    return texts


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"use_fp8": args.fp8, "device": args.device}
    for name in ("dtype", "quantization", "int4_method"):  # unset (or no such flag, as in bench): the default
        if getattr(args, name, None):
            options[name] = getattr(args, name)
    return options


def _engine_location(llm: Any) -> str:
    return str(llm.model_dir)


# -------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-nvidia", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def engine_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"hub id, checkpoint directory or engine directory (default: {DEFAULT_MODEL})")
        p.add_argument("--fp8", action="store_true", help="FP8 (e4m3) weights and activations")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
        p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="compute dtype")
        p.add_argument("--quantization", choices=["fp8", "int4"],
                       help="weight quantization: fp8 (the same as --fp8) or int4 (W4A16, group-wise 128, built once "
                            "and cached); AWQ / GPTQ checkpoints load as INT4 without it")
        p.add_argument("--int4-method", choices=["awq_bounded", "awq", "awq_gptq", "gptq", "rtn"],
                       help="INT4 rounding with --quantization int4 (default: the engine's, see EngineConfig)")

    build = commands.add_parser("build", help="build (and cache) an engine, optionally writing it to a directory",
                                description=cmd_build.__doc__)
    engine_args(build)
    build.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="KV cache storage dtype")
    build.add_argument("--calibration", metavar="FILE", help="FP8 calibration texts: .txt (a line each), .jsonl, .json")
    build.add_argument("--calibration-samples", type=int, default=64, help="texts used for calibration (default 64)")
    build.add_argument("--calibration-max-length", type=int, default=512, help="tokens per calibration text")
    build.add_argument("--output", metavar="DIR", help="also write the engine here; load it with LLM(DIR)")

    chat = commands.add_parser("chat", help="chat in the terminal (streams, keeps history)",
                               description=cmd_chat.__doc__ + " Reads one user message per line from stdin.")
    engine_args(chat)
    chat.add_argument("--system", help="a system message put before the conversation")
    chat.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per answer (default 512)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    chat.add_argument("--seed", type=int, help="sampling seed, for reproducible answers")
    chat.add_argument("--verbose", "-v", action="store_true", help="print token counts and speed to stderr")

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server", description=cmd_serve.__doc__)
    engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $OPTIMUM_NVIDIA_API_KEY)")
    serve.add_argument("--served-model-name", help="the model name clients send (default: MODEL as given)")
    serve.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="KV cache storage dtype")
    serve.add_argument("--max-batch-size", type=int, default=64, help="most sequences in one step (default 64)")
    serve.add_argument("--max-num-tokens", type=int, default=2048, help="token budget per step (default 2048)")
    serve.add_argument("--max-seq-len", type=int, help="prompt + output tokens (default: the model's limit)")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="seconds in-flight requests get to finish on SIGTERM before they are aborted")

    bench = commands.add_parser(
        "bench", help="benchmark: benchmarks/bench.py on a GPU, else a built-in throughput run",
        description=cmd_bench.__doc__ + " Giving --model or --builtin selects the built-in run; arguments this "
        "command does not know go to the script (`bench -- --help` shows the script's own options).")
    bench.add_argument("--model", help=f"model for the built-in run (default: {DEFAULT_MODEL})")
    bench.add_argument("--builtin", action="store_true", help="run the built-in benchmark even if bench.py exists")
    bench.add_argument("--script", help=f"benchmark script to run (default: {BENCH_SCRIPT})")
    bench.add_argument("--fp8", action="store_true", help="FP8 engine (built-in run)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (built-in run)")
    bench.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="compute dtype")
    bench.add_argument("--num-prompts", type=int, default=16, help="requests in the batch (default 16)")
    bench.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")

    commands.add_parser("info", help="GPU, FP8 support, cache entries and sizes", description=cmd_info.__doc__)

    cache = commands.add_parser("cache", help="manage the engine/model cache", description=cmd_cache.__doc__)
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    cache_commands.add_parser("clear", help="delete every cache entry (never other files)",
                              description=cmd_cache.__doc__)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    extra = extra[1:] if extra[:1] == ["--"] else extra  # `bench -- --help` passes --help to the script
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "bench":
            return cmd_bench(args, extra)
        commands = {"build": cmd_build, "chat": cmd_chat, "serve": cmd_serve, "info": cmd_info, "cache": cmd_cache}
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError, TypeError) as error:
        if os.environ.get("OPTIMUM_NVIDIA_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
