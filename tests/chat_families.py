"""Tiny tokenizers and checkpoints around the real chat templates vendored in tests/fixtures/chat_templates.

Each family gets a byte-level BPE tokenizer trained on a few lines, with that family's special tokens (as its
real tokenizer defines them: control tokens special, ``<tool_call>`` / ``<think>`` plain added tokens), its real
template, and a tiny random LLaMA checkpoint sized to it. ``first=`` puts one special token at id 0, and
``silent=True`` zeroes the output head so greedy decoding always picks id 0: the way to make a random model emit
one chosen token (e.g. to check that an end-of-turn token stops generation).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import TINY_BASE, make_hf_model

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
FAMILIES: dict[str, dict] = json.loads((FIXTURES / "families.json").read_text(encoding="utf-8"))
_TEXT = """What is the weather in Paris? Let me check. {"name": "get_weather", "arguments": {"city": "Paris"}}
{"name": "add", "parameters": {"a": 1, "b": 2}} The result is 3. Berlin, Rome, Oslo, Tokyo; 0123456789.
You are a helpful assistant. Think step by step, then answer the question about the city and the numbers."""


def template_text(family: str) -> str:
    return (FIXTURES / FAMILIES[family]["template"]).read_text(encoding="utf-8")


def family_tokenizer(family: str, first: str | None = None):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    specials = list(spec["special"])
    if first is not None:
        specials.remove(first)
        specials.insert(0, first)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_BASE["vocab_size"] - 16, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_TEXT] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=spec.get("bos"), eos_token=spec["eos"],
                                      unk_token=spec.get("unk"), pad_token=spec.get("pad", spec["eos"]))
    wrapped.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.get("added", [])])
    wrapped.chat_template = template_text(family)
    assert len(wrapped) <= TINY_BASE["vocab_size"]
    return wrapped


def write_family_model(out_dir: Path, family: str, first: str | None = None, silent: bool = False,
                       seed: int = 0) -> Path:
    """A tiny model directory of ``family`` (tokenizer, template, random weights) that ``LLM(out_dir)`` loads."""
    out_dir = Path(out_dir)
    tokenizer = family_tokenizer(family, first)
    tokenizer.save_pretrained(str(out_dir))
    ids = {"bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = make_hf_model("llama3", seed, max_position_embeddings=4096, **ids)
    if silent:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
