"""Calibration text sampled from the model itself (data-free calibration, as in LLM-QAT, Liu et al. 2023): each
built-in calibration sample's start (a prose sample's first 16 tokens; a conversation's first user turn with the
generation prompt) is continued by ``--new-tokens`` tokens sampled at temperature 1.0, top-p 0.95, ``--rounds``
times with different seeds. Writes a JSON list of token-id lists for benchmarks/int4_quality.py
``--extra-calibration``. It never sees the held-out text the quality figures are scored on.

    PYTHONPATH=core:. python benchmarks/self_calibration.py --out /tmp/self_calibration.json [--rounds 2]

Cost (SmolLM2-135M, fp32, one CPU thread, transformers' generate): ~6.5 min per round of 34 x 512 tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT)]
PROSE_PREFIX = 16  # tokens of a prose sample kept as the prompt


def prompts(tokenizer) -> list[list[int]]:
    """One prompt per built-in calibration sample."""
    from optimum_nvidia_core.build.calibration import default_calibration_samples

    result = []
    for sample in default_calibration_samples():
        if isinstance(sample, list):  # a conversation: its system turn (if any) and first user turn
            turns = sample[:2] if sample[0]["role"] == "system" else sample[:1]
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            result.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            result.append(tokenizer(sample)["input_ids"][:PROSE_PREFIX])
    return result


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_nvidia_core.hub import DEFAULT_MODEL, resolve_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2, help="continuations per prompt (one seed each)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + rounds - 1")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = str(resolve_model(DEFAULT_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    starts = prompts(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, starts))
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in starts])  # left-padded
    attention_mask = torch.arange(width)[None] >= width - torch.tensor([len(ids) for ids in starts])[:, None]
    samples: list[list[int]] = []
    for seed in range(args.first_seed, args.first_seed + args.rounds):
        start = time.perf_counter()
        torch.manual_seed(seed)
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask.long(), do_sample=True,
                                       temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=args.new_tokens,
                                       min_new_tokens=args.new_tokens, pad_token_id=pad)
        samples += [ids + row[width:].tolist() for ids, row in zip(starts, generated)]
        Path(args.out).write_text(json.dumps(samples))
        print(f"round {seed}: {sum(map(len, samples))} tokens in all ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
