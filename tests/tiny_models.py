"""Tiny random LLaMA-family checkpoints and a tiny tokenizer, written in the tests (no download).

A plain module (not conftest.py) so test files can import it by name: tests/ is on sys.path through its conftest.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
_TOKENIZER_TEXT = """The quick brown fox jumps over the lazy dog. Paris is the capital of France; Berlin is the capital
of Germany. def add(a, b): return a + b. {"name": "get_weather", "arguments": {"city": "Paris"}} 0123456789
Caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e, emoji \U0001F600. Once upon a time there was a small model that
liked to answer questions about the weather, numbers, cities and code."""


# ---- tiny random checkpoints ------------------------------------------------------------------------------------

TINY_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
                 vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
# family name -> (config class name, overrides); one per variant the model must handle
TINY_FAMILIES = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama_bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=1000000.0))),
    "qwen2_sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                          tie_word_embeddings=True)),
    "smollm2": ("LlamaConfig", dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                    tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=100000.0))),
}


def tiny_config(family: str, **overrides):
    """A tiny transformers config of `family` (see TINY_FAMILIES)."""
    import transformers

    class_name, family_overrides = TINY_FAMILIES[family]
    config_class = getattr(transformers, class_name)
    config = config_class(**{**TINY_BASE, **family_overrides, **overrides})
    config.architectures = [class_name.replace("Config", "ForCausalLM")]
    return config


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model of `family` with weights large enough that every layer shapes the logits (fp32)."""
    import transformers

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


def write_tiny_checkpoint(out_dir: Path, family: str = "llama3", seed: int = 0, **overrides):
    """Save a tiny random `family` model (transformers, safetensors) into out_dir; returns (out_dir, hf_model)."""
    model = make_hf_model(family, seed, **overrides)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir), model


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer trained on a few lines, ChatML template, <|im_end|> as EOS (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", unk_token="<|endoftext|>")
    wrapped.chat_template = CHATML_TEMPLATE
    wrapped.save_pretrained(str(out_dir))


