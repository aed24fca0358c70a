"""INT4 quality on the real SmolLM2-135M-Instruct (CPU): where the perplexity goes, method by method and layer type
by layer type. The quality gate (tests/integration/test_int4_quality.py) checks a subset of these figures.

    PYTHONPATH=core:. python benchmarks/int4_quality.py --out /tmp/int4_quality.json [--tokens 1024]
        [--methods rtn,awq,gptq,awq_gptq] [--only-types rtn] [--calibration-samples 24 --calibration-max-length 256]
        [--extra-calibration tokens.json --extra-samples 32] [--mlp-group-size 32] [--also-full]
        [--second-text /usr/share/common-licenses/GPL-3]

Scored on the FP8 gate's held-out text (all 2,372 tokens, or its first ``--tokens`` for quicker runs; with
``--also-full`` the whole text too; ``--second-text``: a second held-out text) against the fp32 model, with ratios
to the bf16 model too. One calibration pass (input Hessians of every linear) serves every calibrated method, as in
the gate. ``--only-types METHOD`` also quantizes one layer type at a time (qkv, o, gate_up, down) with METHOD: the
cost of each type alone. ``--extra-calibration``: a JSON list of token-id lists (e.g. benchmarks/self_calibration.py's
text sampled from the model itself) whose first ``--extra-samples`` join the built-in samples.
``--mlp-group-size 32``: the MLP's linears in groups of 32 (a format the engine does not build yet).
``--first-token-weight``: the Hessian weight of each sample's first token (the attention sink; 0 leaves it out).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT), str(ROOT / "tests" / "integration")]
LAYER_TYPES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def quantized(model_dir: Path, method: str, hessians: dict | None, layer_type: str | None = None,
              mlp_group_size: int = 0):
    """The fp32 model with ``method``'s INT4 weights (every linear, or only those of ``layer_type``);
    ``mlp_group_size``: the MLP's linears get groups of that size instead (a format the engine does not build)."""
    from optimum_nvidia_core.build import int4
    from optimum_nvidia_core.build.int4 import Int4Recipe, apply_awq_scales, quantize_linear
    from optimum_nvidia_core.build.quantize import quantizable_linear_names
    from optimum_nvidia_core.models.loader import load_model

    model = load_model(model_dir, torch.float32, "cpu")
    recipe = Int4Recipe(method)
    hessians = {k: v.clone() for k, v in hessians.items()} if hessians and method != "rtn" else {}
    with _mlp_groups(model, mlp_group_size):
        if recipe.uses_awq_scales:
            apply_awq_scales(model, hessians, recipe.group_size)  # exact: the fp32 function is unchanged
        for name in quantizable_linear_names(model):
            if layer_type is None or name.endswith(layer_type):
                model.set_submodule(name, quantize_linear(model.get_submodule(name), hessians.get(name), recipe))
    return model


@contextlib.contextmanager
def _mlp_groups(model, size: int):
    """While inside, build/int4.py gives the MLP linears of ``model`` groups of ``size`` (0: unchanged)."""
    from optimum_nvidia_core.build import int4

    original = int4.group_size_of
    mlp = {id(layer.mlp.gate_up_proj) for layer in model.model.layers} | {
        id(layer.mlp.down_proj) for layer in model.model.layers}
    if size:
        int4.group_size_of = lambda linear, group: size if id(linear) in mlp else original(linear, group)
    try:
        yield
    finally:
        int4.group_size_of = original


def main() -> None:
    from transformers import AutoTokenizer

    from optimum_nvidia_core.build import perplexity
    from optimum_nvidia_core.build.calibration import collect_stats, default_calibration_samples, tokenize_samples
    from optimum_nvidia_core.build.quantize import quantizable_linear_names
    from optimum_nvidia_core.hub import DEFAULT_MODEL, resolve_model
    from optimum_nvidia_core.models.loader import load_model
    from test_fp8_quality import HELD_OUT_TEXT

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=0, help="score only the first N held-out tokens (0: all)")
    parser.add_argument("--methods", default="rtn,awq,gptq,awq_gptq")
    parser.add_argument("--only-types", metavar="METHOD", help="also quantize one layer type at a time")
    parser.add_argument("--calibration-samples", type=int, default=24)
    parser.add_argument("--calibration-max-length", type=int, default=256)
    parser.add_argument("--extra-calibration", help="JSON list of token-id lists added to the calibration set")
    parser.add_argument("--extra-samples", type=int, default=0, help="how many of them (0: all)")
    parser.add_argument("--mlp-group-size", type=int, default=0, help="MLP linears' group size (0: the recipe's)")
    parser.add_argument("--first-token-weight", type=float, default=1.0,
                        help="weight of each sample's token 0 in the Hessians (0: left out)")
    parser.add_argument("--also-full", action="store_true", help="with --tokens: score the whole text too")
    parser.add_argument("--second-text", help="a second held-out text file (e.g. /usr/share/common-licenses/GPL-3)")
    parser.add_argument("--second-tokens", type=int, default=2048, help="its first N tokens are scored")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    token_ids = tokenizer(HELD_OUT_TEXT)["input_ids"]
    all_ids, token_ids = token_ids, token_ids[:args.tokens] if args.tokens else token_ids
    second_ids = []
    if args.second_text:  # whitespace-normalized: the file's line wrapping is not text
        second_ids = tokenizer(" ".join(Path(args.second_text).read_text().split()))["input_ids"][:args.second_tokens]
    calibration = tokenize_samples(tokenizer, default_calibration_samples()[:args.calibration_samples],
                                   args.calibration_max_length)
    if args.extra_calibration:
        extra = json.loads(Path(args.extra_calibration).read_text())
        calibration += extra[:args.extra_samples] if args.extra_samples else extra
    result = {"date": datetime.date.today().isoformat(), "model": DEFAULT_MODEL, "held_out_tokens": len(token_ids),
              "calibration": {"samples": len(calibration), "tokens": sum(map(len, calibration))},
              "group_size": "128 where it divides in_features, else 64 (SmolLM2's 576-wide inputs)", "figures": {}}

    def record(name: str, model) -> None:
        start = time.perf_counter()
        figures = {"perplexity": perplexity(model, token_ids)}
        if args.also_full:
            figures["full_perplexity"] = perplexity(model, all_ids)
        if second_ids:
            figures["second_perplexity"] = perplexity(model, second_ids)
        for key in list(figures):
            figures[key.replace("perplexity", "ratio")] = figures[key] / result["figures"].get("fp32", figures)[key]
            figures[key.replace("perplexity", "ratio_to_bf16")] = figures[key] / result["figures"].get(
                "bf16", figures)[key]
        result["figures"][name] = figures
        print(f"{name:28s}", "  ".join(f"{key} {value:.4f}" for key, value in figures.items()),
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    reference = load_model(model_dir, torch.float32, "cpu")
    record("fp32", reference)
    record("bf16", load_model(model_dir, torch.bfloat16, "cpu"))
    hessians = collect_stats(reference, [], calibration, progress=False,
                             hessian_names=quantizable_linear_names(reference),
                             first_token_weight=args.first_token_weight).hessians
    del reference
    for method in args.methods.split(","):
        name = f"{method} mlp g{args.mlp_group_size}" if args.mlp_group_size else method
        record(name, quantized(model_dir, method, hessians, mlp_group_size=args.mlp_group_size))
    if args.only_types:
        for layer_type in LAYER_TYPES:
            record(f"{args.only_types} {layer_type} only", quantized(model_dir, args.only_types, hessians, layer_type))


if __name__ == "__main__":
    main()
