"""How a LLaMA-family model splits over `tensor_parallel_size` ranks (Megatron-style), checked before any process
starts.

- q/k/v (fused qkv_proj) and gate/up (fused gate_up_proj) are column-parallel: each rank keeps the rows of its
  query heads, of its KV heads and of its slice of the intermediate size; its output stays sharded.
- o_proj and down_proj are row-parallel: each rank keeps the matching columns; one all-reduce sums the partial
  outputs.
- KV heads are split over the ranks, or replicated when there are fewer KV heads than ranks and the rank count is a
  multiple of them (rank r then uses KV head r // (N // num_kv_heads), the one its query heads read in GQA).
- The embedding and the LM head are vocab-parallel: vocab rows split evenly, the vocab padded up to a multiple of N
  (padded rows are zeros and their logits are cut off after the all-gather).

Every uneven split raises a ValueError naming the dimension, the sizes and the sizes that work for this model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_LISTED_SIZE = 64  # sizes up to this are offered in error messages


def _field(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a config that tensor parallelism splits."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, config: Any) -> "ModelShape":
        """From a transformers config (or its config.json dict)."""
        heads = int(_field(config, "num_attention_heads"))
        head_dim = _field(config, "head_dim") or int(_field(config, "hidden_size")) // heads
        return cls(num_heads=heads, num_kv_heads=int(_field(config, "num_key_value_heads") or heads),
                   head_dim=int(head_dim), intermediate_size=int(_field(config, "intermediate_size")),
                   vocab_size=int(_field(config, "vocab_size")))


def split_problem(shape: ModelShape, size: int) -> str | None:
    """Why `size` ranks cannot split this model, or None when they can."""
    if shape.num_heads % size:
        return f"num_attention_heads={shape.num_heads} is not divisible by tensor_parallel_size={size}"
    kv = shape.num_kv_heads
    if kv >= size and kv % size:
        return f"num_key_value_heads={kv} is not divisible by tensor_parallel_size={size}"
    if kv < size and size % kv:
        return (f"num_key_value_heads={kv} is fewer than tensor_parallel_size={size} and {size} is not a multiple "
                f"of {kv}, so the KV heads can be neither split nor replicated evenly")
    if shape.intermediate_size % size:
        return f"intermediate_size={shape.intermediate_size} is not divisible by tensor_parallel_size={size}"
    return None


def valid_sizes(shape: ModelShape, limit: int = MAX_LISTED_SIZE) -> list[int]:
    """Every tensor_parallel_size up to `limit` that splits this model evenly."""
    return [n for n in range(1, limit + 1) if split_problem(shape, n) is None]


def _listed(sizes: list[int]) -> str:
    words = [str(n) for n in sizes]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


@dataclass(frozen=True)
class SplitPlan:
    """Which slice of each split dimension rank `r` of `world_size` holds. Build it with ``plan_split``."""

    shape: ModelShape
    world_size: int

    @property
    def heads_per_rank(self) -> int:
        return self.shape.num_heads // self.world_size

    @property
    def kv_heads_per_rank(self) -> int:
        return max(self.shape.num_kv_heads // self.world_size, 1)

    @property
    def kv_replicas(self) -> int:
        """Ranks that hold the same KV head (1 when the KV heads are split, not replicated)."""
        return max(self.world_size // self.shape.num_kv_heads, 1)

    @property
    def intermediate_per_rank(self) -> int:
        return self.shape.intermediate_size // self.world_size

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.shape.vocab_size // self.world_size) * self.world_size

    @property
    def vocab_per_rank(self) -> int:
        return self.padded_vocab_size // self.world_size

    def query_heads(self, rank: int) -> range:
        return range(rank * self.heads_per_rank, (rank + 1) * self.heads_per_rank)

    def kv_heads(self, rank: int) -> range:
        first = (rank // self.kv_replicas) * self.kv_heads_per_rank
        return range(first, first + self.kv_heads_per_rank)

    def intermediate(self, rank: int) -> slice:
        return slice(rank * self.intermediate_per_rank, (rank + 1) * self.intermediate_per_rank)

    def vocab(self, rank: int) -> slice:
        """Rows of the PADDED vocab that the rank holds (rows past vocab_size are padding)."""
        return slice(rank * self.vocab_per_rank, (rank + 1) * self.vocab_per_rank)

    def q_rows(self, rank: int) -> slice:
        """Rows of q_proj (one checkpoint tensor) that the rank keeps."""
        d, q = self.shape.head_dim, self.query_heads(rank)
        return slice(q.start * d, q.stop * d)

    def kv_rows(self, rank: int) -> slice:
        """Rows of k_proj (and of v_proj) that the rank keeps."""
        d, kv = self.shape.head_dim, self.kv_heads(rank)
        return slice(kv.start * d, kv.stop * d)

    def qkv_rows(self, rank: int) -> list[slice]:
        """Row slices of the fused qkv_proj weight ([q | k | v] rows) that the rank keeps, in q, k, v order."""
        q_size = self.shape.num_heads * self.shape.head_dim
        kv_size = self.shape.num_kv_heads * self.shape.head_dim
        q, kv = self.q_rows(rank), self.kv_rows(rank)
        return [q, slice(q_size + kv.start, q_size + kv.stop),
                slice(q_size + kv_size + kv.start, q_size + kv_size + kv.stop)]

    def gate_up_rows(self, rank: int) -> list[slice]:
        """Row slices of the fused gate_up_proj weight ([gate | up] rows) that the rank keeps."""
        inter, part = self.shape.intermediate_size, self.intermediate(rank)
        return [part, slice(inter + part.start, inter + part.stop)]

    def o_proj_columns(self, rank: int) -> slice:
        return self.q_rows(rank)  # o_proj reads the attention output of the rank's query heads


def plan_split(config: Any, tensor_parallel_size: int) -> SplitPlan:
    """The split of `config` (a transformers config or config.json dict) over `tensor_parallel_size` ranks; a
    ValueError saying what to pick when it does not split evenly."""
    size = tensor_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    shape = ModelShape.of(config)
    problem = split_problem(shape, size)
    if problem is not None:
        raise ValueError(f"{problem}; tensor_parallel_size values that split this model evenly: "
                         f"{_listed(valid_sizes(shape))}")
    return SplitPlan(shape, size)
