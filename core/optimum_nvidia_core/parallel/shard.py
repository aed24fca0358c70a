"""A loaded LlamaForCausalLM -> this rank's shard of it, by swapping modules (gpt-fast style).

Per decoder layer: qkv_proj and gate_up_proj become column-parallel, o_proj and down_proj row-parallel, and the
attention modules keep this rank's head counts (so the KV cache the runner allocates holds only this rank's KV
heads). The embedding and the LM head become vocab-parallel; a tied LM head shares the sharded embedding.
Norms, rotary embeddings and everything outside the layers stay replicated: every rank computes them on the same
full hidden state, so after each all-reduce the ranks hold identical activations.

``shard_model`` cuts a model already loaded in full: fine for models one device holds (and for FP8 / INT4 engines,
which load through their own paths). ``load_shard`` never holds more than the rank's shard: it shards the model
while it is still on the meta device, then streams only the rank's slice of each checkpoint tensor into it (what a
model that only fits sharded, 70B on H200s, needs).
"""
from __future__ import annotations

import torch
from torch import nn

from .embedding import ParallelLMHead, VocabParallelEmbedding, vocab_rows
from .linear import column_parallel, row_parallel
from .split import SplitPlan, plan_split


@torch.no_grad()
def shard_model(model: nn.Module, rank: int, world_size: int, group=None) -> nn.Module:
    """Swap `model`'s (a LlamaForCausalLM, full weights) layers for rank `rank`'s shards, in place; returns it.
    ``world_size=1`` leaves the model as it is. `group`: the process group of the ranks (None: the default)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside 0..{world_size - 1} (tensor_parallel_size={world_size})")
    plan = plan_split(model.config, world_size)
    if world_size == 1:
        return model
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, plan, rank, group)
        mlp = layer.mlp
        mlp.gate_up_proj = column_parallel(mlp.gate_up_proj, plan.gate_up_rows(rank))
        mlp.down_proj = row_parallel(mlp.down_proj, plan.intermediate(rank), group)
    _shard_vocab(model, plan, rank, group)
    model.tensor_parallel = (rank, world_size)
    return model


def _shard_attention(attention: nn.Module, plan: SplitPlan, rank: int, group) -> None:
    d = plan.shape.head_dim
    attention.qkv_proj = column_parallel(attention.qkv_proj, plan.qkv_rows(rank))
    attention.o_proj = row_parallel(attention.o_proj, plan.o_proj_columns(rank), group)
    heads, kv_heads = plan.heads_per_rank, plan.kv_heads_per_rank
    attention.num_heads, attention.num_kv_heads = heads, kv_heads
    attention.split_sizes = [heads * d, kv_heads * d, kv_heads * d]
    attention.attn.num_heads, attention.attn.num_kv_heads = heads, kv_heads


def _shard_vocab(model: nn.Module, plan: SplitPlan, rank: int, group) -> None:
    rows = plan.vocab(rank)
    embedding = nn.Parameter(vocab_rows(model.model.embed_tokens.weight, rows), requires_grad=False)
    model.model.embed_tokens = VocabParallelEmbedding(embedding, rows.start, group)
    head = embedding if model.tie_word_embeddings else nn.Parameter(vocab_rows(model.lm_head.weight, rows),
                                                                     requires_grad=False)
    model.lm_head = ParallelLMHead(head, plan.shape.vocab_size, plan.world_size, group)


# checkpoint module -> how a rank slices its weight: "rows" of q / kv heads or of the intermediate size, "columns"
# (row-parallel: the bias stays whole), "vocab" rows padded with zeros
_CHECKPOINT_SLICES = {"q_proj": ("rows", SplitPlan.q_rows), "k_proj": ("rows", SplitPlan.kv_rows),
                      "v_proj": ("rows", SplitPlan.kv_rows), "gate_proj": ("rows", SplitPlan.intermediate),
                      "up_proj": ("rows", SplitPlan.intermediate), "o_proj": ("columns", SplitPlan.o_proj_columns),
                      "down_proj": ("columns", SplitPlan.intermediate), "embed_tokens": ("vocab", SplitPlan.vocab),
                      "lm_head": ("vocab", SplitPlan.vocab)}


def rank_slice(name: str, tensor: torch.Tensor, plan: SplitPlan, rank: int) -> torch.Tensor:
    """The part of checkpoint tensor `name` (a Hugging Face LLaMA-family name) that rank `rank` holds."""
    parts = name.split(".")
    how = _CHECKPOINT_SLICES.get(parts[-2]) if len(parts) >= 2 else None
    if how is None:
        return tensor  # norms: replicated
    kind, part_of = how
    if kind == "rows":
        return tensor[part_of(plan, rank)]
    if kind == "columns":
        return tensor[:, part_of(plan, rank)] if parts[-1] == "weight" else tensor
    return vocab_rows(tensor, part_of(plan, rank))


@torch.no_grad()
def load_shard(model_dir, dtype: torch.dtype, device, rank: int, world_size: int, group=None) -> nn.Module:
    """Rank `rank`'s shard of a plain (bf16 / fp16 / fp32) checkpoint, streamed: the rank's memory holds its shard
    and one checkpoint tensor at a time."""
    from pathlib import Path

    from ..models.llama import LlamaForCausalLM
    from ..models.loader import checkpoint_tensors, load_config, load_weights

    config = load_config(Path(model_dir))
    plan = plan_split(config, world_size)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = shard_model(model, rank, world_size, group).to_empty(device=torch.device(device))
    model.tie_weights()  # to_empty gives each module its own tensor: share the (sharded) embedding again
    tensors = ((name, rank_slice(name, tensor, plan, rank)) for name, tensor in checkpoint_tensors(Path(model_dir)))
    load_weights(model, tensors)
    return model.eval()
