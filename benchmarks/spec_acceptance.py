"""Prompt-lookup acceptance on real text: the real SmolLM2 answering RAG questions on the CPU.

    PYTHONPATH=core:. python benchmarks/spec_acceptance.py --out /tmp/spec_acceptance.json

Each prompt is a question plus the 4 passages of a small built-in corpus that share the most words with it (the
kind of prompt examples/langchain_rag.py builds), through the chat template. The model answers greedily
(temperature 0, 128 tokens) through ``LLM.generate``. Each answer is then replayed through the n-gram proposer
and greedy verification: at each decode step the proposal's accepted prefix is its longest prefix equal to the
known greedy continuation (exactly what verification keeps, since greedy output is unchanged), plus the one token
the verify step itself yields. Reported per (k, prompt_lookup_min, prompt_lookup_max): tokens per verify step, the
fraction of steps with a proposal, and the decode steps saved against plain decoding.

``--check-logits`` also runs the verification itself (``layers.rejection_sampler.greedy_verify``) on the real
model's logits: one teacher-forced forward of prompt + answer gives every position's logits a verify step needs
(positions past the first disagreement are never used), and the tokens it emits are compared with the answer.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

PASSAGES = [
    "The Aurora-7 greenhouse on Lake Tessel grows strawberries all winter. It is heated by water pumped from a hot "
    "spring 300 meters below the lake. The warm water runs through pipes under the soil beds and returns to the "
    "lake at 18 degrees.",
    "Aurora-7 opened in 2019. It was founded by the engineer Mira Okafor, who also designed its glass roof. The roof "
    "has 4,200 panes of triple glass and lets in 92 percent of the daylight.",
    "Visitors can tour Aurora-7 on Saturdays from 10:00 to 14:00. Tickets cost 12 euros, and children under 10 enter "
    "for free. Tours start at the east gate and last about one hour.",
    "The Lake Tessel ferry leaves the north pier every 40 minutes and stops at Aurora-7 and at Kell Island. A "
    "single ticket costs 3 euros; bicycles travel free on weekdays.",
    "Bees from three hives pollinate the strawberries at Aurora-7. The honey is sold in the greenhouse shop in "
    "250-gram jars, and the shop is open every day except Monday.",
    "The Harbor Street library lends telescopes for two weeks at a time. It hosts a chess club on Tuesdays at "
    "18:00 and a children's reading hour on Sunday mornings.",
    "The Brennan Bridge crosses the Varo River at its narrowest point. It is 640 meters long, it opened in 1931, "
    "and it was the first steel arch bridge in the region. Trams cross it every six minutes.",
    "The Varo River rises in the Morn Hills and flows 310 kilometers to the sea. Its delta is a bird reserve where "
    "about 40,000 flamingos spend the winter.",
    "The Kell Island lighthouse is 38 meters tall and was built in 1874 from local granite. Its lamp can be seen "
    "from 22 nautical miles away, and it has been automatic since 1989.",
    "The city museum on Dock Square shows the history of the harbor. Its largest object is the steam tug Maren, "
    "built in 1908. Entry is free on the first Sunday of each month; otherwise it costs 8 euros.",
    "Solvik Dairy makes a blue cheese called Tessel Blue from the milk of 400 cows. The cheese ripens for 90 days "
    "in a cave at a steady 9 degrees, and it won a gold medal in 2022.",
    "The annual Lantern Festival takes place on the last Saturday of September. About 2,000 paper lanterns float "
    "down the Varo River from the Brennan Bridge to Dock Square after sunset.",
]

QUESTIONS = [
    "How is the Aurora-7 greenhouse heated?",
    "Who founded Aurora-7 and what did she design?",
    "When can visitors tour Aurora-7 and how much do tickets cost?",
    "How often does the Lake Tessel ferry run and what does a ticket cost?",
    "What happens to the honey from the Aurora-7 bees?",
    "What does the Harbor Street library offer?",
    "Tell me about the Brennan Bridge.",
    "Where does the Varo River flow and what lives in its delta?",
    "Describe the Kell Island lighthouse.",
    "What can I see at the city museum and what does entry cost?",
    "How is Tessel Blue cheese made?",
    "What happens at the Lantern Festival?",
]
SYSTEM = "Answer the question using only this context. Quote the context where you can.\n\nContext:\n{context}"
SETTINGS = [(k, n_min, n_max) for k in (2, 4, 8) for n_min, n_max in ((1, 2), (1, 3), (2, 4), (3, 5))]


def retrieve(question: str, passages: list[str], count: int = 4) -> list[str]:
    """The `count` passages that share the most words with the question (a stand-in for an embedding search)."""
    words = set(re.findall(r"\w+", question.lower()))
    scores = [len(words & set(re.findall(r"\w+", p.lower()))) for p in passages]
    order = sorted(range(len(passages)), key=lambda i: -scores[i])
    return [passages[i] for i in sorted(order[:count])]


def rag_messages(question: str) -> list[dict]:
    context = "\n".join(f"- {p}" for p in retrieve(question, PASSAGES))
    return [{"role": "system", "content": SYSTEM.format(context=context)}, {"role": "user", "content": question}]


def rag_prompt_ids(tokenizer) -> list[list[int]]:
    """The token ids of every question's RAG prompt, through the chat template."""
    prompts = [tokenizer.apply_chat_template(rag_messages(q), add_generation_prompt=True, tokenize=True)
               for q in QUESTIONS]
    return [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]


def replay(prompt: list[int], output: list[int], proposer) -> dict:
    """Greedy speculative decoding of a known greedy answer: the first token comes from the prefill step; each
    later verify step emits the accepted prefix of its proposal plus one token."""
    tokens = prompt + output[:1]
    steps = proposed = 0
    while len(tokens) < len(prompt) + len(output):
        done = len(tokens) - len(prompt)
        left = len(output) - done
        proposal = proposer.propose(tokens, max_tokens=left - 1).tolist()
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == output[done + accepted]:
            accepted += 1
        tokens += output[done: done + accepted + 1]
        steps += 1
        proposed += bool(proposal)
    return {"decode_tokens": len(output) - 1, "verify_steps": steps, "steps_with_proposal": proposed}


def summarize(rows: list[dict]) -> dict:
    tokens = sum(r["decode_tokens"] for r in rows)
    steps = sum(r["verify_steps"] for r in rows)
    per_prompt = [r["decode_tokens"] / r["verify_steps"] for r in rows if r["verify_steps"]]
    return {
        "tokens_per_step": tokens / steps,  # decode tokens / verify steps, over all prompts (bonus token included)
        "mean_tokens_per_step_per_prompt": sum(per_prompt) / len(per_prompt),
        "min_tokens_per_step_per_prompt": min(per_prompt),
        "fraction_of_steps_with_proposal": sum(r["steps_with_proposal"] for r in rows) / steps,
        "decode_steps_plain": tokens, "decode_steps_speculative": steps,
        "decode_steps_saved_fraction": 1 - steps / tokens,
    }


def check_with_logits(model_dir: Path, prompts, outputs, ks) -> list[dict]:
    """greedy_verify on the real model's logits (transformers, fp32 CPU) reproduces the answer at every step."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_nvidia_core.engine.ngram_proposer import NgramProposer
    from optimum_nvidia_core.layers.rejection_sampler import greedy_verify

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():  # position i of each row predicts output[i]
        logits = [model(torch.tensor([p + o])).logits[0, len(p) - 1:] for p, o in zip(prompts, outputs)]
    not_argmax = sum((row[: len(o)].argmax(-1) != torch.tensor(o)).sum().item() for row, o in zip(logits, outputs))
    checks = []
    for k in ks:
        proposer = NgramProposer(k, prompt_lookup_max=3, prompt_lookup_min=1)
        steps = differing = 0
        for prompt, output, row in zip(prompts, outputs, logits):
            done = 1
            while done < len(output):
                proposal = proposer.propose(prompt + output[:done], max_tokens=len(output) - done - 1).tolist()
                draft = torch.tensor([proposal + [-1] * (k - len(proposal))])
                window = row[done: done + k + 1]
                window = torch.cat([window, window[-1:].expand(k + 1 - len(window), -1)])[None]  # pad at the end
                out = greedy_verify(window, draft)
                emitted = out.token_ids[0, : out.num_emitted.item()].tolist()[: len(output) - done]
                differing += emitted != output[done: done + len(emitted)]
                done += len(emitted)
                steps += 1
        checks.append({"k": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3, "verify_steps": steps,
                       "steps_whose_tokens_differ_from_the_answer": differing,
                       "answer_tokens_not_the_teacher_forced_argmax": not_argmax})
    return checks


def measure(llm, prompts: list[list[int]], params) -> dict:
    """Generate the answers once, then replay them under every proposer setting."""
    from optimum_nvidia_core.engine.ngram_proposer import NgramProposer

    begin = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - begin
    outputs = [list(o.token_ids) for o in outs]
    scenario = {"sampling": {"temperature": 0.0, "frequency_penalty": params.frequency_penalty},
                "generate_seconds": seconds, "output_tokens": [len(o) for o in outputs],
                "finish_reasons": [o.finish_reason for o in outs], "settings": [],
                "answers": [{"question": q, "text": o.text} for q, o in zip(QUESTIONS, outs)],
                "output_token_ids": outputs}
    for k, n_min, n_max in SETTINGS:
        proposer = NgramProposer(k, prompt_lookup_max=n_max, prompt_lookup_min=n_min)
        rows = [replay(p, o, proposer) for p, o in zip(prompts, outputs)]
        entry = {"k": k, "prompt_lookup_min": n_min, "prompt_lookup_max": n_max, **summarize(rows),
                 "per_prompt_tokens_per_step": [r["decode_tokens"] / r["verify_steps"] for r in rows]}
        scenario["settings"].append(entry)
        print(f"frequency_penalty={params.frequency_penalty:g} k={k} n={n_min}..{n_max}: "
              f"{entry['tokens_per_step']:.2f} tokens/step, {entry['fraction_of_steps_with_proposal']:.0%} steps "
              f"proposed, {entry['decode_steps_saved_fraction']:.0%} steps saved", flush=True)
    return scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--check-logits", action="store_true")
    parser.add_argument("--frequency-penalties", type=lambda v: [float(x) for x in v.split(",")], default=[0.0, 0.5],
                        help="one greedy run per value; examples/langchain_rag.py uses 0.5 against small-model loops")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
    from optimum_nvidia_core import LLM, SamplingParams

    llm = LLM(device="cpu")
    prompts = rag_prompt_ids(llm.tokenizer)
    result = {"date": datetime.date.today().isoformat(), "device": "cpu", "model": llm.model_name,
              "max_tokens": args.max_tokens, "prompt_token_ids": prompts, "scenarios": {}}
    for penalty in args.frequency_penalties:
        name = "greedy" if penalty == 0 else f"greedy_frequency_penalty_{penalty:g}"
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, frequency_penalty=penalty)
        scenario = result["scenarios"][name] = measure(llm, prompts, params)
        if args.check_logits and penalty == 0:
            scenario["logits_check"] = check_with_logits(llm.model_dir, prompts, scenario["output_token_ids"],
                                                          (2, 4, 8))
            print(scenario["logits_check"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
