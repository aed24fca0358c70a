"""Tensor parallelism on the CPU: the split plan's checks, and 2 / 3 gloo ranks (spawned processes) that each load
the same tiny checkpoint, shard it and run prefill + greedy decode through the paged-KV model forward; their tokens
and logits equal the unsharded model's. A rank that fails stops the others within seconds."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from optimum_nvidia_core.models.loader import load_model
from optimum_nvidia_core.parallel import (MULTICAST_OFF, RankFailed, init_rank, join_ranks, load_shard, plan_split,
                                          shard_model, spawn_ranks, valid_sizes)
from optimum_nvidia_core.parallel.split import ModelShape
from tiny_models import write_tiny_checkpoint

SMOLLM2 = dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=576, intermediate_size=1536,
               vocab_size=49152)
PROMPTS = [[5, 17, 99, 3, 250, 41, 8, 77, 12, 300, 6], [400, 2, 9, 33, 18]]
DECODE_STEPS = 5
SPAWN_TIMEOUT_S = 120


# ---- the split plan ------------------------------------------------------------------------------------------

def test_smollm2_splits_over_1_or_3_ranks_only():
    assert valid_sizes(ModelShape.of(SMOLLM2), limit=16) == [1, 3]
    plan = plan_split(SMOLLM2, 3)
    assert (plan.heads_per_rank, plan.kv_heads_per_rank, plan.kv_replicas) == (3, 1, 1)
    assert plan.intermediate_per_rank == 512 and plan.vocab_per_rank == 16384


@pytest.mark.parametrize("size, message", [
    (2, "num_attention_heads=9 is not divisible by tensor_parallel_size=2; tensor_parallel_size values that "
        "split this model evenly: 1 or 3"),
    (9, "intermediate_size=1536 is not divisible by tensor_parallel_size=9; tensor_parallel_size values that "
        "split this model evenly: 1 or 3"),
])
def test_uneven_split_names_dimension_sizes_and_choices(size, message):
    with pytest.raises(ValueError) as info:
        plan_split(SMOLLM2, size)
    assert str(info.value) == message


def test_kv_heads_that_neither_split_nor_replicate_are_refused():
    config = dict(num_attention_heads=12, num_key_value_heads=6, hidden_size=768, intermediate_size=1536,
                  vocab_size=1000)
    with pytest.raises(ValueError, match=r"num_key_value_heads=6 is not divisible by tensor_parallel_size=4; .*"
                                         r"1, 2, 3, 6 or 12"):
        plan_split(config, 4)
    config["num_key_value_heads"] = 4  # 4 KV heads over 6 ranks: 6 is not a multiple of 4
    with pytest.raises(ValueError, match="num_key_value_heads=4 is fewer than tensor_parallel_size=6"):
        plan_split(config, 6)


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "2"])
def test_tensor_parallel_size_must_be_a_positive_integer(size):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        plan_split(SMOLLM2, size)


def test_fewer_kv_heads_than_ranks_are_replicated_where_query_heads_read_them():
    plan = plan_split(dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=64,
                           vocab_size=10), 4)
    assert (plan.heads_per_rank, plan.kv_heads_per_rank, plan.kv_replicas) == (2, 1, 2)
    group = 8 // 2  # query head h reads KV head h // group (GQA)
    for rank in range(4):
        assert {h // group for h in plan.query_heads(rank)} == set(plan.kv_heads(rank))
    assert [plan.kv_heads(r).start for r in range(4)] == [0, 0, 1, 1]
    # the vocab (10) is padded to 12: four ranks of 3 rows, the last holding 1 real row and 2 padding rows
    assert (plan.padded_vocab_size, plan.vocab(3)) == (12, slice(9, 12))


def test_rank_outside_the_group_is_refused(tmp_path):
    path, _ = write_tiny_checkpoint(tmp_path / "m", "llama3")
    model = load_model(path, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"rank=2 is outside 0..1"):
        shard_model(model, rank=2, world_size=2)
    assert shard_model(model, rank=0, world_size=1) is model


# ---- sharded models on gloo ranks -----------------------------------------------------------------------------

def _to_fp8(model) -> None:
    """Every decoder linear to FP8 (per-channel weights) as the FP8 recipe sets them: static input scales, down_proj
    dynamic per token."""
    from optimum_nvidia_core.layers.fp8_linear import Fp8Linear

    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            absmax = None if name == "down_proj" else 6.0
            setattr(parent, name, Fp8Linear.from_linear(getattr(parent, name), absmax))


def _tests_conftest():
    """tests/conftest.py, loaded by path: a spawned rank that imported it by name could get tests/gpu/conftest.py
    (both are named "conftest" on sys.path)."""
    import importlib.util
    import sys

    name = "_tensor_parallel_tests_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "conftest.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def _greedy(model_dir: Path, how: str, rank: int = 0, world_size: int = 1) -> dict:
    """Load ("full": then shard; "fp8": quantize, then shard; "streamed": load_shard), then prefill both PROMPTS
    in one step and run DECODE_STEPS greedy decode steps of both."""
    PagedRunner = _tests_conftest().PagedRunner
    if how == "streamed":
        model = load_shard(model_dir, torch.float32, "cpu", rank, world_size)
    else:
        model = load_model(model_dir, torch.float32, "cpu")
        if how == "fp8":
            _to_fp8(model)
        model = shard_model(model, rank, world_size)
    runner = PagedRunner(model, num_blocks=32, block_size=4)
    last_rows = torch.tensor([len(p) for p in PROMPTS]).cumsum(0) - 1
    logits = [runner.step([(i, p) for i, p in enumerate(PROMPTS)])[last_rows]]
    for _ in range(DECODE_STEPS):
        tokens = logits[-1].argmax(-1).tolist()
        logits.append(runner.step([(i, [t]) for i, t in enumerate(tokens)]))
    stacked = torch.stack(logits)  # [steps + 1, 2, vocab]
    return {"tokens": stacked.argmax(-1), "logits": stacked,
            "kv_heads": runner.model.attention_layers()[0].k_cache.shape[2]}


def _rank_runs(rank: int, world_size: int, init_method: str, cases: list, out_dir: str) -> None:
    import torch.distributed as dist

    init_rank(rank, world_size, init_method, "gloo", timeout_s=30)
    results = {name: _greedy(Path(path), how, rank, world_size) for name, path, how in cases}
    results["environment"] = {name: os.environ.get(name) for name in MULTICAST_OFF}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


# name -> (family, config overrides, how the rank loads it: see _greedy)
TWO_RANKS = {
    "llama2": ("llama2", {}, "full"),  # 4 KV heads: 2 per rank
    "llama3": ("llama3", {}, "full"),  # 2 KV heads: 1 per rank
    "llama3_one_kv_head": ("llama3", dict(num_key_value_heads=1), "full"),  # replicated on both ranks
    "llama_bias": ("llama_bias", {}, "full"),  # row-parallel biases, added once
    "mistral": ("mistral", {}, "full"),  # sliding window 8 < the prompt
    "qwen2": ("qwen2", {}, "full"),  # q/k/v biases
    "smollm2": ("smollm2", {}, "full"),  # tied embeddings
    "llama3_fp8": ("llama3", {}, "fp8"),
    "llama_bias_streamed": ("llama_bias", {}, "streamed"),
    "llama3_one_kv_head_streamed": ("llama3", dict(num_key_value_heads=1), "streamed"),
}
# 6 heads, 192 intermediate over 3 ranks; the vocab (511) padded to 513: 171 rows a rank
THREE = dict(hidden_size=96, num_attention_heads=6, intermediate_size=192, vocab_size=511)
THREE_RANKS = {
    "llama3": ("llama3", dict(THREE, num_key_value_heads=3), "full"),
    "qwen2": ("qwen2", dict(THREE, num_key_value_heads=3), "full"),
    "mistral": ("mistral", dict(THREE, num_key_value_heads=3), "full"),
    "smollm2": ("smollm2", dict(THREE, num_key_value_heads=1), "full"),  # one KV head on 3 ranks, tied
    "qwen2_fp8": ("qwen2", dict(THREE, num_key_value_heads=3), "fp8"),
    "smollm2_streamed": ("smollm2", dict(THREE, num_key_value_heads=1), "streamed"),
    "llama3_streamed": ("llama3", dict(THREE, num_key_value_heads=3), "streamed"),
}


@pytest.mark.parametrize("world_size, cases", [(2, TWO_RANKS), (3, THREE_RANKS)], ids=["tp2", "tp3"])
def test_sharded_greedy_decode_equals_one_rank(world_size, cases, tmp_path):
    checkpoints = [(name, write_tiny_checkpoint(tmp_path / name, family, seed=1, **overrides)[0], how)
                   for name, (family, overrides, how) in cases.items()]
    environment = dict(os.environ)
    context = spawn_ranks(_rank_runs, world_size, (world_size, f"file://{tmp_path / 'rendezvous'}",
                                                   [(n, str(p), f) for n, p, f in checkpoints], str(tmp_path)))
    assert dict(os.environ) == environment  # the multicast switches went to the children only
    join_ranks(context, SPAWN_TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for rank in ranks:
        assert rank.pop("environment") == MULTICAST_OFF
    for name, path, how in checkpoints:
        expected = _greedy(path, "fp8" if how == "fp8" else "full")  # one rank: the model as loaded today
        for rank in ranks:
            assert rank[name]["tokens"].tolist() == expected["tokens"].tolist(), name
            tolerance = 1e-3 if how == "fp8" else 1e-4
            torch.testing.assert_close(rank[name]["logits"], expected["logits"], atol=tolerance, rtol=tolerance,
                                       msg=name)
        num_kv_heads = cases[name][1].get("num_key_value_heads", 4 if cases[name][0] == "llama2" else 2)
        assert ranks[0][name]["kv_heads"] == max(num_kv_heads // world_size, 1), name


# ---- failures --------------------------------------------------------------------------------------------------

def _rank_that_fails(rank: int, init_method: str, how: str, mark: str) -> None:
    import torch.distributed as dist

    init_rank(rank, 2, init_method, "gloo", timeout_s=30)
    if rank == 1:
        Path(mark).write_text(str(time.time()))
        if how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("rank 1 fails on purpose")
    dist.all_reduce(torch.ones(1))  # waits for rank 1, which never comes
    time.sleep(120)


@pytest.mark.parametrize("how, reason", [("raises", "rank 1 fails on purpose"), ("killed", "SIGKILL")])
def test_a_failing_rank_stops_the_others_within_seconds(how, reason, tmp_path):
    mark = tmp_path / "failed_at"
    context = spawn_ranks(_rank_that_fails, 2, (f"file://{tmp_path / 'rendezvous'}", how, str(mark)))
    with pytest.raises(RankFailed, match=reason):
        join_ranks(context, SPAWN_TIMEOUT_S)
    assert time.time() - float(mark.read_text()) < 5.0
    for pid in context.pids():
        assert not Path(f"/proc/{pid}").exists(), f"rank process {pid} is still running"


def test_ranks_that_hang_are_stopped_at_the_timeout(tmp_path):
    context = spawn_ranks(_rank_that_fails, 1, (f"file://{tmp_path / 'rendezvous'}", "never", ""))
    started = time.monotonic()
    with pytest.raises(RankFailed, match="did not finish within"):
        join_ranks(context, timeout_s=3)
    assert time.monotonic() - started < 6
    assert not any(Path(f"/proc/{pid}").exists() for pid in context.pids())
