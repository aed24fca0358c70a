"""Random-weight checkpoints shaped like real models, written as a user's checkpoint would be on disk.

config.json + sharded safetensors (Hugging Face names) + a word-level tokenizer whose ids cover the whole
vocabulary (the benchmark feeds token ids; the tokenizer only has to be loadable and decode any id).
Weights are drawn on the GPU (seconds for 7B) and moved to the host one tensor at a time. The unit tests write
their tiny random checkpoints with the same writer (``write_random_checkpoint``).
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
    """Write (once) a random bf16 checkpoint of `shape` into out_dir, with a tokenizer; returns out_dir."""
    out_dir = Path(out_dir)
    if (out_dir / "done").exists():
        return out_dir
    config = llama_config(shape)
    write_random_checkpoint(config, out_dir, std=std, max_shard_bytes=max_shard_bytes, device="cuda")
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    write_tokenizer(out_dir, config.vocab_size)
    (out_dir / "done").write_text("ok")
    return out_dir


def write_random_checkpoint(config, out_dir: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            max_shard_bytes: int = 2 << 30, std: float = 0.02, device: str = "cpu") -> Path:
    """Write config.json + random safetensors weights (sharded with an index past max_shard_bytes) to out_dir.

    Any LLaMA-family config (the unit tests' tiny ones, real models' shapes here); no transformers modeling code.
    Weights are drawn on ``device`` and moved to the host one tensor at a time.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    shards, current, current_bytes = [], {}, 0
    for name, shape in hf_weight_shapes(config).items():
        tensor = std * torch.randn(shape, generator=generator, device=device)
        if name.endswith("norm.weight"):
            tensor += 1.0
        tensor = tensor.to(dtype).cpu()
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name], current_bytes = tensor, current_bytes + size
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(str(out_dir))
    return out_dir


def hf_weight_shapes(config) -> dict[str, tuple[int, ...]]:
    """The Hugging Face checkpoint names and shapes for `config` (our fused parameters split back into parts)."""
    from optimum_nvidia_core.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    unpacked = {}
    for fused_part, (fused, shard) in model.packed_modules.items():
        unpacked.setdefault(fused, {})[shard] = fused_part
    shapes = {}
    for name, param in model.named_parameters():  # tied lm_head appears once, as the embedding
        module_path, leaf = name.rsplit(".", 1)
        module = model.get_submodule(module_path)
        owner, fused = module_path.rsplit(".", 1) if "." in module_path else ("", module_path)
        if fused in unpacked:
            for shard, part in unpacked[fused].items():
                rows = module.shard_rows(shard)
                shapes[f"{owner}.{part}.{leaf}"] = (rows.stop - rows.start, *param.shape[1:])
        else:
            shapes[name] = tuple(param.shape)
    return shapes


def weight_bytes(shape: str, linear_bytes_per_param: float) -> dict:
    """Bytes a decode step must read: the linear layers at their width, embeddings row, LM head in bf16."""
    s = SHAPES[shape]
    h, i, layers, vocab = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    head_dim = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i
    return {"linear": layers * per_layer * linear_bytes_per_param, "lm_head": vocab * h * 2,
            "kv_per_token": layers * 2 * kv}  # kv_per_token: elements; times the cache's bytes per element
