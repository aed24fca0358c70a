"""The markdown table of a bench.py result (also used by the README)."""
from __future__ import annotations

from pathlib import Path

NAMES = {"transformers": "transformers eager bf16", "bf16": "ours bf16", "fp8": "ours FP8",
         "fp8kv": "ours FP8 + FP8 KV"}


def _f(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def write_report(result: dict, path: Path) -> None:
    c = result["ceilings"]
    lines = [f"# Benchmark {result['date']} on {result['gpu']}", "",
             f"Versions: {result['versions']}. Ceilings measured in this run: read {c['read_TBps']:.2f} TB/s, "
             f"copy {c['copy_TBps']:.2f} TB/s, bf16 GEMM {c['bf16_gemm_TFLOPs']:.0f} TFLOP/s, "
             f"FP8 GEMM {c['fp8_gemm_TFLOPs']:.0f} TFLOP/s (8192^3, random data).", ""]
    for shape, entry in result["models"].items():
        lines += [f"## {shape} (random weights, bf16 checkpoint on local disk)", "",
                  "| engine | TTFT 128 ms | TTFT 512 ms | TTFT 2048 ms | decode tok/s bs1 | % roofline bs1 | "
                  "out tok/s @1 | @8 | @64 | @256 | @1024 | seed metric @256 | 1000/1000 out tok/s (ours @256, "
                  "transformers @64) | start s | cached start s | peak GiB |",
                  "|" + "---|" * 16]
        base = entry.get("transformers", {})
        for key, label in NAMES.items():
            row = entry.get(key)
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {label} | error: {row['error'][:200]} |")
                continue
            ttft, tput = row.get("ttft_ms", {}), row.get("throughput", {})
            get = lambda d, k: d.get(k, d.get(str(k)))  # noqa: E731 - json turns int keys into strings
            out = [get(tput, n) or {} for n in (1, 8, 64, 256, 1024)]
            long = row.get("throughput_long_256") or row.get("throughput_long_64") or {}
            lines.append(
                f"| {label} | {_f(get(ttft, 128), 1)} | {_f(get(ttft, 512), 1)} | {_f(get(ttft, 2048), 1)} | "
                f"{_f(row.get('decode_tok_s_bs1'), 1)} | {_f(row.get('roofline_pct_bs1'), 1)} | "
                + " | ".join(_f(o.get("output_tok_s")) for o in out)
                + f" | {_f(out[3].get('seed_metric_tok_s'))} | "
                f"{_f(long.get('output_tok_s'))} | "
                f"{_f(row.get('first_start_s', row.get('load_s')), 1)} | {_f(row.get('cached_start_s'), 1)} | "
                f"{_f(row.get('peak_memory_GiB'), 1)} |")
        if base and "error" not in base:
            lines += ["", "Ratios to transformers (same run, same card):", ""]
            for key in ("bf16", "fp8", "fp8kv"):
                row = entry.get(key)
                if not row or "error" in row:
                    continue
                get = lambda d, k: d.get(k, d.get(str(k)))  # noqa: E731
                ratios = [f"decode bs1 x{row['decode_tok_s_bs1'] / base['decode_tok_s_bs1']:.1f}"]
                ratios += [f"TTFT {n} x{get(base['ttft_ms'], n) / get(row['ttft_ms'], n):.1f} faster"
                           for n in (128, 512, 2048)]
                for n in (1, 8, 64, 256):
                    ratios.append(f"@{n} x{get(row['throughput'], n)['output_tok_s'] / get(base['throughput'], n)['output_tok_s']:.1f}")
                lines.append(f"- {NAMES[key]}: " + ", ".join(ratios))
        lines.append("")
    lines += ["Roofline: weight bytes of every linear layer (1 byte/param for FP8, 2 for bf16) + LM head (bf16) + "
              "K/V of 256 context tokens, over the read bandwidth above. 'start s' for FP8 includes the build "
              "(quantize + calibrate + write) with "
              f"{result.get('weight_rounding', 'gptq')} weight rounding; 'cached start s' loads the built engine. "
              "Peak memory includes the KV-cache pool sized to gpu_memory_utilization.", ""]
    Path(path).write_text("\n".join(lines))
