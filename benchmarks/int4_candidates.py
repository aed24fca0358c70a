"""Every INT4 GEMM candidate (kernels/int4_gemm.candidates) timed on the Llama-3-8B decode shapes, weights read
from HBM (rotating copies, > 4x L2), in a CUDA graph: what the tuner chooses between, and how far each kind is
from the card's read bandwidth.

    PYTHONPATH=core:. python benchmarks/int4_candidates.py --out int4-candidates.json [--m 1,16] [--sweep]

``--sweep`` times a wider grid of GEMV tiles (M == 1) than the tuner's list: how that list was chosen.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_bench import GEMM_SHAPES, GROUP, _int4_weights, int4_bytes  # noqa: E402
from kernel_bench import graph_ms  # noqa: E402


def gemv_grid() -> list:
    from optimum_nvidia_core.kernels.int4_gemm import Int4Config

    return [Int4Config("gemv", 1, n, 128, split, warps, 3, tiles) for tiles in (1, 2, 4)
            for n in (64, 128, 256) for warps in (2, 4, 8) for split in (1, 2, 4, 8, 16)
            if n * 16 // (32 * warps) <= 64 and split * tiles <= 16]  # at most 64 words a thread


def main() -> None:
    from optimum_nvidia_core.kernels.int4_gemm import candidates, int4_gemm

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--m", default="1,16")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "rows": []}
    for name, n, k in GEMM_SHAPES:
        weights = _int4_weights(n, k)
        for m in map(int, args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            timed = []
            configs = candidates(m, GROUP, k)
            if args.sweep and m == 1:
                configs = list(dict.fromkeys(gemv_grid() + configs))
            for config in configs:
                try:
                    ms = graph_ms(lambda w, c=config: int4_gemm(x, *w, config=c), weights)
                except Exception as error:  # noqa: BLE001 - recorded: a tile this card cannot hold
                    timed.append({"config": config, "error": f"{type(error).__name__}: {str(error)[:120]}"})
                    continue
                timed.append({"config": config, "us": ms * 1e3, "GBps": int4_bytes(n, k) / ms / 1e6})
            timed.sort(key=lambda row: row.get("us", float("inf")))
            for row in timed[:6]:
                print(name, m, row, flush=True)
            print(name, m, "errors:", sum("error" in row for row in timed), [r for r in timed if "error" in r][:1])
            result["rows"].append({"shape": name, "N": n, "K": k, "M": m, "candidates": timed})
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
