"""The seed's two README snippets run with only the import line (and the model id) changed, on the real SmolLM2,
and give transformers' greedy text; `optimum-nvidia chat` keeps history in a real conversation.

The snippets are the seed's text verbatim (optimum-nvidia README / launch blog). Besides the import line and the model
id, one thing differs on a machine without a GPU: the model snippet's `.to("cuda")` becomes `.to("cpu")`. The
tokenizer line loads from the converted default model directory, since transformers alone cannot resolve our offline
default model id.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from optimum_nvidia_core import LLM, SamplingParams
from optimum_nvidia_core.hub import DEFAULT_MODEL

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_MODEL_ID = "meta-llama/Llama-2-7b-chat-hf"
SEED_MODEL_ID_13B = "meta-llama/Llama-2-13b-chat-hf"

PIPELINE_SNIPPET = """
from optimum.nvidia.pipelines import pipeline

# everything else is the same as in transformers!
pipe = pipeline('text-generation', 'meta-llama/Llama-2-7b-chat-hf', use_fp8=True)
pipe("Describe a real-world application of AI in sustainable energy.")
"""

MODEL_SNIPPET = """
from optimum.nvidia import AutoModelForCausalLM
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("meta-llama/Llama-2-13b-chat-hf", padding_side="left")

model = AutoModelForCausalLM.from_pretrained(
  "meta-llama/Llama-2-13b-chat-hf",
  use_fp8=True,
)

model_inputs = tokenizer(
    ["How is autonomous vehicle technology transforming the future of transportation and urban planning?"],
    return_tensors="pt"
).to("cuda")

generated_ids, generated_length = model.generate(
    **model_inputs,
    top_k=40,
    top_p=0.7,
    repetition_penalty=10,
)

tokenizer.batch_decode(generated_ids[0], skip_special_tokens=True)
"""
PIPELINE_PROMPT = "Describe a real-world application of AI in sustainable energy."
MODEL_PROMPT = "How is autonomous vehicle technology transforming the future of transportation and urban planning?"


def run_snippet(code: str) -> tuple[object, dict]:
    """Execute a snippet; return the value of its last expression (as a notebook shows it) and its namespace."""
    tree = ast.parse(code)
    last = tree.body.pop() if isinstance(tree.body[-1], ast.Expr) else None
    namespace: dict = {}
    exec(compile(tree, "<snippet>", "exec"), namespace)
    value = eval(compile(ast.Expression(last.value), "<snippet>", "eval"), namespace) if last else None
    return value, namespace


def ported(code: str, model_dir: Path, **replacements: str) -> str:
    """The seed snippet with only the import line and the model ids changed (see the module doc)."""
    code = code.replace("from optimum.nvidia.pipelines import", "from optimum_nvidia_core.pipelines import")
    code = code.replace("from optimum.nvidia import", "from optimum_nvidia_core import")
    tokenizer_line = 'AutoTokenizer.from_pretrained("{}"'
    code = code.replace(tokenizer_line.format(SEED_MODEL_ID_13B), tokenizer_line.format(model_dir))
    code = code.replace(SEED_MODEL_ID, DEFAULT_MODEL).replace(SEED_MODEL_ID_13B, DEFAULT_MODEL)
    if not torch.cuda.is_available():
        code = code.replace('.to("cuda")', '.to("cpu")')
    for old, new in replacements.items():
        assert old in code
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_dir), padding_side="left")


# ---- the pipeline snippet ----------------------------------------------------------------------------------------

def test_pipeline_snippet_runs_as_written(smollm2_dir):
    result, _ = run_snippet(ported(PIPELINE_SNIPPET, smollm2_dir))  # FP8, sampled: as in the seed's README
    assert isinstance(result, list) and len(result) == 1 and set(result[0]) == {"generated_text"}
    assert result[0]["generated_text"].startswith(PIPELINE_PROMPT)  # SmolLM2 often ends right there (EOS)


def test_pipeline_snippet_greedy_text_equals_transformers(smollm2_dir, hf_model, hf_tokenizer):
    greedy = {'use_fp8=True)': 'use_fp8=False)', 'sustainable energy.")': 'sustainable energy.", do_sample=False)'}
    ours, _ = run_snippet(ported(PIPELINE_SNIPPET, smollm2_dir, **greedy))
    reference = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tokenizer)
    assert ours == reference(PIPELINE_PROMPT, do_sample=False)  # 256 new tokens unless EOS, as transformers
    # Greedy SmolLM2 ends that plain-text prompt at once; the same request as a chat gets a real answer.
    pipe, chat = run_snippet(ported(PIPELINE_SNIPPET, smollm2_dir, **greedy))[1]["pipe"], [
        {"role": "user", "content": PIPELINE_PROMPT}]
    answer = pipe(chat, do_sample=False, max_new_tokens=64)
    assert answer == reference(chat, do_sample=False, max_new_tokens=64)
    assert len(answer[0]["generated_text"][-1]["content"]) > 100


# ---- the AutoModelForCausalLM snippet ----------------------------------------------------------------------------

def test_model_snippet_runs_as_written(smollm2_dir):
    texts, namespace = run_snippet(ported(MODEL_SNIPPET, smollm2_dir))  # FP8, as in the seed's blog post
    ids, lengths = namespace["generated_ids"], namespace["generated_length"]
    assert ids.ndim == 3 and ids.shape[:2] == (1, 1) and lengths.shape == (1, 1)
    assert isinstance(texts, list) and len(texts) == 1 and texts[0].startswith(MODEL_PROMPT)


def test_model_snippet_greedy_text_equals_transformers(smollm2_dir, hf_model, hf_tokenizer):
    texts, namespace = run_snippet(ported(MODEL_SNIPPET, smollm2_dir, **{"use_fp8=True": "use_fp8=False"}))
    inputs = namespace["model_inputs"]
    # transformers 5 itself refuses an int repetition_penalty, so the reference passes 10.0
    expected = hf_model.generate(**inputs, top_k=40, top_p=0.7, repetition_penalty=10.0)
    assert texts == hf_tokenizer.batch_decode(expected, skip_special_tokens=True)
    ids, lengths = namespace["generated_ids"], namespace["generated_length"]
    assert ids[0, 0, : lengths[0, 0]].tolist() == expected[0].tolist()[: int(lengths[0, 0])]


def test_left_padded_batch_equals_transformers_token_for_token(hf_model, hf_tokenizer):
    from optimum_nvidia_core import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, device="cpu", max_batch_size=8)
    prompts = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):"]
    inputs = hf_tokenizer(prompts, return_tensors="pt", padding=True)
    ids, lengths = model.generate(**inputs, max_new_tokens=32, repetition_penalty=1.2)
    expected = hf_model.generate(**inputs, max_new_tokens=32, repetition_penalty=1.2, do_sample=False)
    width = inputs["input_ids"].shape[1]
    for i in range(len(prompts)):
        prompt = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
        new = ids[i, 0, len(prompt): lengths[i, 0]].tolist()
        assert new == expected[i, width: width + len(new)].tolist()
        assert len(new) == 32 or new[-1] == hf_tokenizer.eos_token_id


# ---- the CLI on the real model -----------------------------------------------------------------------------------

def test_cli_chat_keeps_the_conversation(smollm2_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "core"), str(REPO_ROOT)]))
    turns = ["What is the capital of France?", "And what is its most famous tower?"]
    chat = subprocess.run(
        [sys.executable, "-m", "optimum_nvidia_core", "chat", DEFAULT_MODEL, "--device", "cpu", "--temperature", "0",
         "--max-new-tokens", "24"], input="\n".join(turns) + "\n", capture_output=True, text=True, env=env,
        timeout=600)
    assert chat.returncode == 0, chat.stderr

    llm = LLM(DEFAULT_MODEL, device="cpu")
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    history = [{"role": "user", "content": turns[0]}]
    first = llm.chat(history, greedy).text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": turns[1]}]
    second = llm.chat(history, greedy).text
    assert chat.stdout == f"{first}\n{second}\n"
