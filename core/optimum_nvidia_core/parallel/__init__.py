"""Tensor parallelism over the GPUs of one host (NCCL), or CPU processes (gloo): the split plan, sharded layers,
the model shard and the rank processes. See split.py for the layout."""
from __future__ import annotations

from .launch import MULTICAST_OFF, RankFailed, init_rank, join_ranks, spawn_ranks
from .shard import load_shard, shard_model
from .split import SplitPlan, plan_split, valid_sizes

__all__ = ["MULTICAST_OFF", "RankFailed", "SplitPlan", "init_rank", "join_ranks", "load_shard", "plan_split",
           "shard_model", "spawn_ranks", "valid_sizes"]
