"""Tensor parallelism over NCCL on 2 GPUs (skipped with fewer): bf16 and FP8 shards generate what one GPU does,
and a CUDA graph that captures the all-reduces replays what eager runs.

Run: ``PYTHONPATH=core:. python -m pytest tests/gpu/test_tensor_parallel_gpu.py -q``
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from optimum_nvidia_core.attention_metadata import AttentionMetadata
from optimum_nvidia_core.models.loader import load_model
from optimum_nvidia_core.parallel import init_rank, join_ranks, shard_model, spawn_ranks
from tiny_models import write_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")
BLOCK = 16
NEW_TOKENS = 12


class OneSequence:
    """One sequence over contiguous cache blocks: prefill, then one token a step (the same on every rank)."""

    def __init__(self, model, device, num_blocks: int = 16):
        self.model, self.device, self.length = model, device, 0
        dtype = next(model.parameters()).dtype
        for layer in model.attention_layers():
            shape = (num_blocks, BLOCK, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.table = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]

    def inputs(self, tokens: list[int]):
        start, end = self.length, self.length + len(tokens)
        self.length = end
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=self.device)  # noqa: E731
        attn = AttentionMetadata(
            slot_mapping=as_tensor(list(range(start, end)), torch.int64),
            query_start_loc=as_tensor([0, len(tokens)], torch.int32), context_lens=as_tensor([end], torch.int32),
            block_tables=self.table, max_query_len=len(tokens), max_context_len=end,
            query_lens_host=[len(tokens)], context_lens_host=[end])
        return as_tensor(tokens, torch.int64), as_tensor(list(range(start, end)), torch.int64), attn

    @torch.inference_mode()
    def greedy(self, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
        """-> (NEW_TOKENS greedy tokens, their logits [NEW_TOKENS, V] float32 on the host)."""
        tokens, logits = list(prompt), []
        for _ in range(NEW_TOKENS):
            ids, positions, attn = self.inputs(tokens[self.length:])
            logits.append(self.model.compute_logits(self.model(ids, positions, attn)[-1:])[0])
            tokens.append(int(logits[-1].argmax()))
        return tokens[len(prompt):], torch.stack(logits).cpu()


def _load(path: str, fp8: bool, device, rank: int = 0, world_size: int = 1):
    model = load_model(Path(path), torch.bfloat16, device)
    if fp8:
        from optimum_nvidia_core.layers.fp8_linear import Fp8Linear

        for layer in model.model.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                absmax = None if name == "down_proj" else 6.0  # the FP8 recipe: down_proj dynamic
                setattr(parent, name, Fp8Linear.from_linear(getattr(parent, name), absmax))
    shard_model(model, rank, world_size)
    if fp8:
        model.fuse_fp8_input_quantization()
    return model


def _rank_generates(rank: int, init_method: str, path: str, fp8: bool, prompt: list[int], out_dir: str) -> None:
    import torch.distributed as dist

    from optimum_nvidia_core.engine.cuda_graph_runner import CudaGraphRunner

    init_rank(rank, 2, init_method, "nccl", timeout_s=120)
    device = torch.device("cuda", rank)
    model = _load(path, fp8, device, rank, 2)
    runner = OneSequence(model, device)
    tokens, logits = runner.greedy(prompt)
    # CUDA graphs with the all-reduces inside, captured in lockstep on both ranks, against eager
    graphs = CudaGraphRunner(model, max_batch_size=2, max_blocks_per_seq=16, device=device)
    graphs.capture()
    assert graphs.graphs, "CUDA graph capture failed on this rank (see the log)"
    ids, positions, attn = runner.inputs([tokens[-1]])
    with torch.inference_mode():
        replayed = model.compute_logits(graphs.run(ids, positions, attn)).cpu()
        runner.length -= 1
        eager = model.compute_logits(model(*runner.inputs([tokens[-1]]))).cpu()
    torch.save({"tokens": tokens, "logits": logits, "replayed": replayed, "eager": eager},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


# head_dim 16: the sizes the Triton attention kernels (and so the CUDA graphs) take
@pytest.mark.parametrize("family, overrides, fp8", [
    ("llama3", {}, False), ("qwen2", {}, False), ("smollm2", dict(head_dim=16), False), ("llama3", {}, True),
    ("llama3", dict(num_key_value_heads=1), False),  # one KV head, replicated on both GPUs
])
def test_two_gpu_shards_generate_what_one_gpu_does(family, overrides, fp8, tmp_path):
    path, _ = write_tiny_checkpoint(tmp_path / family, family, seed=1, **overrides)
    rng = random.Random(torch.initial_seed())
    prompt = [rng.randrange(3, 500) for _ in range(23)]
    context = spawn_ranks(_rank_generates, 2, (f"file://{tmp_path / 'rendezvous'}", str(path), fp8, prompt,
                                               str(tmp_path)), backend="nccl")
    join_ranks(context, timeout_s=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["tokens"] == ranks[1]["tokens"]
    for rank in ranks:
        torch.testing.assert_close(rank["replayed"], rank["eager"], atol=2e-2, rtol=2e-2)
    # One GPU, teacher-forced on the two GPUs' tokens: each of them is its argmax or (bf16 all-reduce rounding at
    # a near-tie) within 2% of the logit range of it.
    one = OneSequence(_load(str(path), fp8, torch.device("cuda", 0)), torch.device("cuda", 0))
    with torch.inference_mode():
        ids, positions, attn = one.inputs(prompt + ranks[0]["tokens"][:-1])
        logits = one.model.compute_logits(one.model(ids, positions, attn))[len(prompt) - 1:].cpu()
    chosen = logits.gather(1, torch.tensor(ranks[0]["tokens"])[:, None])[:, 0]
    spread = logits.max(-1).values - logits.min(-1).values
    assert (chosen >= logits.max(-1).values - 0.02 * spread).all()
    assert (logits.argmax(-1) == torch.tensor(ranks[0]["tokens"])).float().mean() >= 0.8
    torch.testing.assert_close(ranks[0]["logits"], logits, atol=0.05 * spread.max().item(), rtol=0)
