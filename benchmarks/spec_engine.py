"""Prompt-lookup speculative decoding through the engine: the real SmolLM2 answering RAG questions on the CPU.

    PYTHONPATH=core:. python benchmarks/spec_engine.py --out /tmp/spec_engine.json

The prompts of ``spec_acceptance.py`` (a question plus its 4 best-matching passages, chat template), answered
greedily one request at a time (bs1: an agent waiting on one stream) by ``LLM(device="cpu")`` and by
``LLM(device="cpu", speculative="ngram", ...)``, for each setting and each frequency penalty. Per request the
engine's own step counter gives the decode steps (all steps but the prefill's), so tokens per decode step is
(output tokens - 1) / decode steps, as ``spec_acceptance.py``'s offline replay counts it; the engine's
speculation counters give proposals and accepted tokens. Every speculative answer is checked against the plain
one, token for token. Wall times are reported, but this CPU is shared: they are no speed measurement.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_acceptance import rag_prompt_ids  # noqa: E402

SPEC_COUNTERS = ("spec_verify_steps", "spec_proposals", "spec_proposed_tokens", "spec_accepted_tokens")


def answer_each(llm, prompts: list[list[int]], params) -> dict:
    """One request at a time: the answers, and per request its engine steps and speculation counters."""
    rows, begin = [], time.perf_counter()
    for prompt in prompts:
        before = llm.stats()
        out = llm.generate([prompt], params)[0]
        after = llm.stats()
        row = {"token_ids": list(out.token_ids), "finish_reason": out.finish_reason,
               "steps": after["steps"] - before["steps"]}
        row.update({name: after[name] - before[name] for name in SPEC_COUNTERS if name in after})
        rows.append(row)
    return {"seconds": time.perf_counter() - begin, "rows": rows}


def summarize(run: dict) -> dict:
    rows = run["rows"]
    decode_tokens = sum(len(r["token_ids"]) - 1 for r in rows)
    decode_steps = sum(r["steps"] - 1 for r in rows)  # the first step of each request is its prefill
    summary = {"output_tokens": sum(len(r["token_ids"]) for r in rows), "decode_tokens": decode_tokens,
               "decode_steps": decode_steps, "tokens_per_decode_step": decode_tokens / decode_steps,
               "per_prompt_tokens_per_decode_step": [(len(r["token_ids"]) - 1) / max(1, r["steps"] - 1)
                                                     for r in rows],
               "seconds": run["seconds"]}
    if "spec_proposals" in rows[0]:
        proposals = sum(r["spec_proposals"] for r in rows)
        summary.update({name: sum(r[name] for r in rows) for name in SPEC_COUNTERS})
        summary["decode_steps_with_proposal_fraction"] = proposals / decode_steps
        summary["accepted_per_proposal"] = summary["spec_accepted_tokens"] / max(1, proposals)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--frequency-penalties", type=lambda v: [float(x) for x in v.split(",")], default=[0.0])
    parser.add_argument("--ks", type=lambda v: [int(x) for x in v.split(",")], default=[8],
                        help="num_speculative_tokens values, one engine each (prompt_lookup_min 1, max 3)")
    args = parser.parse_args()
    settings = [dict(num_speculative_tokens=k, prompt_lookup_min=1, prompt_lookup_max=3) for k in args.ks]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
    from optimum_nvidia_core import LLM, SamplingParams

    plain = LLM(device="cpu")
    prompts = rag_prompt_ids(plain.tokenizer)
    speculative = [LLM(device="cpu", speculative="ngram", **setting) for setting in settings]
    result = {"date": datetime.date.today().isoformat(), "device": "cpu", "model": plain.model_name,
              "max_tokens": args.max_tokens, "batch": "one request at a time", "scenarios": {}}
    for penalty in args.frequency_penalties:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, frequency_penalty=penalty)
        reference = answer_each(plain, prompts, params)
        scenario = {"frequency_penalty": penalty, "plain": summarize(reference), "speculative": []}
        for setting, llm in zip(settings, speculative):
            run = answer_each(llm, prompts, params)
            same = [r["token_ids"] == p["token_ids"] and r["finish_reason"] == p["finish_reason"]
                    for r, p in zip(run["rows"], reference["rows"])]
            entry = {**setting, **summarize(run), "outputs_equal_plain": sum(same), "prompts": len(same)}
            scenario["speculative"].append(entry)
            print(f"frequency_penalty={penalty:g} k={setting['num_speculative_tokens']}: "
                  f"{entry['tokens_per_decode_step']:.2f} tokens per decode step, {entry['decode_steps']} decode "
                  f"steps (plain {scenario['plain']['decode_steps']}), {sum(same)}/{len(same)} outputs equal plain",
                  flush=True)
            result["scenarios"][f"frequency_penalty_{penalty:g}"] = scenario
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))  # after each run: a slow CPU keeps the rest


if __name__ == "__main__":
    main()
