"""Random-weight checkpoints shaped like real models, written as a user's checkpoint would be on disk.

config.json + sharded safetensors (Hugging Face names) + a word-level tokenizer whose ids cover the whole
vocabulary (the benchmark feeds token ids; the tokenizer only has to be loadable and decode any id).
Weights are drawn on the GPU (seconds for 7B) and moved to the host one tensor at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.architectures = ["LlamaForCausalLM"]
    return config


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<unk>")
    wrapped.save_pretrained(str(out_dir))


def write_checkpoint(shape: str, out_dir: Path, std: float = 0.02, max_shard_bytes: int = 5 << 30) -> Path:
    """Write (once) a random bf16 checkpoint of `shape` into out_dir; returns out_dir."""
    from safetensors.torch import save_file

    from optimum_nvidia_core.models.loader import hf_weight_shapes

    out_dir = Path(out_dir)
    if (out_dir / "done").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    config = llama_config(shape)
    generator = torch.Generator(device="cuda").manual_seed(0)
    shards, current, size = [], {}, 0
    for name, dims in hf_weight_shapes(config).items():
        tensor = torch.randn(dims, device="cuda", generator=generator) * std
        if name.endswith("norm.weight"):
            tensor += 1.0
        tensor = tensor.to(torch.bfloat16).cpu()
        nbytes = tensor.numel() * 2
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(str(out_dir))
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    write_tokenizer(out_dir, config.vocab_size)
    (out_dir / "done").write_text("ok")
    return out_dir


def weight_bytes(shape: str, linear_bytes_per_param: float) -> dict:
    """Bytes a decode step must read: the linear layers at their width, embeddings row, LM head in bf16."""
    s = SHAPES[shape]
    h, i, layers, vocab = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    head_dim = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i
    return {"linear": layers * per_layer * linear_bytes_per_param, "lm_head": vocab * h * 2,
            "kv_per_token": layers * 2 * kv}  # kv_per_token: elements; times the cache's bytes per element
