"""A loaded LlamaForCausalLM -> this rank's shard of it, by swapping modules (gpt-fast style).

Per decoder layer: qkv_proj and gate_up_proj become column-parallel, o_proj and down_proj row-parallel, and the
attention modules keep this rank's head counts (so the KV cache the runner allocates holds only this rank's KV
heads). The embedding and the LM head become vocab-parallel; a tied LM head shares the sharded embedding.
Norms, rotary embeddings and everything outside the layers stay replicated: every rank computes them on the same
full hidden state, so after each all-reduce the ranks hold identical activations.

The full model is loaded first, then cut: fine for models one device holds. For models that only fit sharded
(70B on H200s), the loader must stream each rank's slices instead (see the design note in the issue).
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
    embedding = vocab_rows(model.model.embed_tokens.weight, rows)
    model.model.embed_tokens = VocabParallelEmbedding(embedding, rows.start, group)
    head = embedding if model.tie_word_embeddings else vocab_rows(model.lm_head.weight, rows)
    model.lm_head = ParallelLMHead(head, plan.shape.vocab_size, plan.world_size, group)
