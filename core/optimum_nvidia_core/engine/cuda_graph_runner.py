"""Engine steps replayed from CUDA graphs: decode steps per batch-size bucket, prefill and mixed steps per token
bucket.

A decode step of a 7B model launches a few hundred small kernels; launched one by one from Python, the gaps
between them cost as much as the work. A CUDA graph records the whole forward once per bucket and replays it
with one launch. Graphs replay fixed addresses, so every input lives in a static buffer that `run` fills:
input_ids, positions, slot_mapping, query_start_loc, context_lens, block_tables. A batch is padded up to its
bucket; padding tokens have slot -1 (nothing stored), padding sequences a query of length 0 (their attention
programs exit at once) and context 0. All graphs share one memory pool, captured largest first so the smaller
ones reuse its blocks.

Three families:
- decode: one token per sequence, batch buckets up to max_batch_size (the split-K decode attention kernel);
- prefill: one sequence's chunk, token buckets up to max_prefill_tokens, at most MIXED_GRAPH_TOKENS (a first
  token pays for no padding sequences);
- mixed: any batch of up to max_batch_size sequences (prefill chunks and decodes together) whose tokens fit a
  token bucket up to max_mixed_tokens. The prefill attention kernel runs with a grid for max_batch_size
  sequences and reads each one's real length on the device. Steps larger than that are compute-bound: they run
  eagerly, where launch gaps are hidden behind the work.
Only the model forward is captured; logits and sampling run eagerly on the rows that sample.
"""
from __future__ import annotations

import logging
import time

import torch

from ..attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)
MIXED_GRAPH_TOKENS = 2048  # default max_mixed_tokens: larger steps are compute-bound


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, every 16 up to 256, every 32 up to 512, then every 64, up to max_batch_size (always
    included): padding wastes at most 1/8 of a bucket past 16 rows."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, min(max_batch_size, 256), 16))
    sizes += list(range(256, min(max_batch_size, 512), 32))
    sizes += list(range(512, max_batch_size, 64))
    return sorted(set(sizes + [max_batch_size]))


def token_buckets(max_tokens: int) -> list[int]:
    """Prefill lengths 16, 32, 48, 64, 96, 128, 192, ... (steps of at most 1.5x) up to max_tokens (included):
    a chunk pads by under half of its length."""
    sizes, size = [], 16
    while size < max_tokens:
        sizes.append(size)
        size = size + 16 if size < 64 else (size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3)
    return sizes + [max_tokens]


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_blocks_per_seq: int,
                 device: torch.device, max_prefill_tokens: int = 0, max_mixed_tokens: int = 0):
        self.model = model
        self.device = device
        self.buckets = batch_buckets(max_batch_size)
        # Longer chunks are compute-bound (an 8B model's 2,048 tokens: ~30 ms of GEMMs behind ~5 ms of launches), so
        # they run eagerly: their graphs would be the slowest to warm up and capture, and the largest in the pool.
        prefill_tokens = min(max_prefill_tokens, MIXED_GRAPH_TOKENS)
        self.prefill_buckets = token_buckets(prefill_tokens) if prefill_tokens > 1 else []
        self.mixed_buckets = token_buckets(max_mixed_tokens) if max_mixed_tokens > 1 and max_batch_size > 1 else []
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_seqs = self.buckets[-1]
        self.capture_seconds: dict[str, float] = {}  # family -> seconds its warm-ups and captures took
        # family -> bucket -> (graph, static hidden [bucket, H] the graph writes)
        self.families: dict[str, dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]] = {
            "decode": {}, "prefill": {}, "mixed": {}}
        size = max([self.max_seqs] + self.prefill_buckets + self.mixed_buckets)
        as_int = dict(device=device)
        self.input_ids = torch.zeros(size, dtype=torch.int64, **as_int)
        self.positions = torch.zeros(size, dtype=torch.int64, **as_int)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, **as_int)
        self.context_lens = torch.zeros(self.max_seqs, dtype=torch.int32, **as_int)
        self.block_tables = torch.zeros(self.max_seqs, max_blocks_per_seq, dtype=torch.int32, **as_int)
        self.decode_query_start_loc = torch.arange(self.max_seqs + 1, dtype=torch.int32, **as_int)  # fixed
        self.query_start_loc = torch.zeros(self.max_seqs + 1, dtype=torch.int32, **as_int)  # prefill / mixed

    # Kept for callers that look at one family: decode graphs by batch bucket, prefill graphs by token bucket.
    @property
    def graphs(self) -> dict[int, torch.cuda.CUDAGraph]:
        return {b: g for b, (g, _) in self.families["decode"].items()}

    @property
    def prefill_graphs(self) -> dict[int, torch.cuda.CUDAGraph]:
        return {b: g for b, (g, _) in self.families["prefill"].items()}

    @property
    def mixed_graphs(self) -> dict[int, torch.cuda.CUDAGraph]:
        return {b: g for b, (g, _) in self.families["mixed"].items()}

    def _metadata(self, family: str, bucket: int) -> AttentionMetadata:
        """Views of the static buffers for one bucket. max_context_len is the largest context a sequence can
        have, so the attention kernels are captured with enough partitions for any replay; a prefill or mixed
        graph is captured for `bucket` query tokens of `seqs` sequences, whose real lengths are read on the
        device."""
        if family == "decode":
            seqs, query_start_loc, max_query_len = bucket, self.decode_query_start_loc[:bucket + 1], 1
        else:
            seqs = 1 if family == "prefill" else self.max_seqs
            query_start_loc, max_query_len = self.query_start_loc[:seqs + 1], bucket
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], query_start_loc=query_start_loc,
            context_lens=self.context_lens[:seqs], block_tables=self.block_tables[:seqs],
            max_query_len=max_query_len, max_context_len=self._max_context(),
            query_lens_host=[max_query_len] * seqs, context_lens_host=[0] * seqs,
        )

    def _max_context(self) -> int:
        return self.max_blocks_per_seq * self.model.attention_layers()[0].k_cache.shape[1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket. On failure (e.g. a layer without a CUDA kernel that syncs with the host)
        log why and keep none, so every step runs eagerly."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        plan = [("prefill", self.prefill_buckets), ("mixed", self.mixed_buckets), ("decode", self.buckets)]
        try:  # largest first: the smaller graphs reuse the pool's blocks
            for family, buckets in sorted(plan, key=lambda item: -max(item[1], default=0)):
                begin = time.perf_counter()
                for bucket in reversed(buckets):
                    self.families[family][bucket] = self._capture_one(bucket, self._metadata(family, bucket), pool)
                torch.cuda.synchronize(self.device)
                self.capture_seconds[family] = time.perf_counter() - begin
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
            logger.warning("CUDA graph capture failed (%s: %s); the model runs eagerly. Set enforce_eager=True "
                           "to skip the attempt.", type(error).__name__, error)
            for graphs in self.families.values():
                graphs.clear()
            return
        torch.cuda.synchronize(self.device)
        logger.info("captured CUDA graphs in %.1f s (%s): decode batch sizes %s; prefill tokens %s; mixed tokens "
                    "%s (up to %d sequences)", time.perf_counter() - start,
                    ", ".join(f"{f} {s:.1f} s" for f, s in self.capture_seconds.items()), self.buckets,
                    self.prefill_buckets, self.mixed_buckets, self.max_seqs)

    def _capture_one(self, rows: int, attn: AttentionMetadata, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        ids, positions = self.input_ids[:rows], self.positions[:rows]
        self.model(ids, positions, attn)  # warm-up: Triton compiles, the FP8 tuner and cuBLAS pick kernels
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = self.model(ids, positions, attn)
        return graph, output

    def fits(self, num_seqs: int) -> bool:
        return bool(self.families["decode"]) and num_seqs <= self.max_seqs

    def _family(self, attn: AttentionMetadata, num_tokens: int) -> str | None:
        """Which family replays this batch: None when it runs eagerly."""
        if attn.is_decode_only:
            return "decode" if self.fits(attn.num_seqs) else None
        if attn.num_seqs == 1 and self.families["prefill"] and num_tokens <= self.prefill_buckets[-1]:
            return "prefill"
        if self.families["mixed"] and attn.num_seqs <= self.max_seqs and num_tokens <= self.mixed_buckets[-1]:
            return "mixed"
        return None

    def can_replay(self, attn: AttentionMetadata) -> bool:
        """A decode-only batch that fits a batch bucket, one sequence's prefill chunk that fits a token bucket,
        or a mixed batch that fits a mixed token bucket."""
        return self._family(attn, attn.slot_mapping.shape[0]) is not None

    def bucket_for(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, H] for a batch that `can_replay`. The result is a view of
        the graph's output buffer: use it before the next `run`."""
        tokens, num_seqs = input_ids.shape[0], attn.num_seqs
        family = self._family(attn, tokens)
        if family is None:
            raise ValueError(f"CudaGraphRunner.run takes decode-only batches of at most {self.max_seqs} "
                             f"sequences, one sequence's prefill of at most {self.prefill_buckets[-1:]} tokens or "
                             f"mixed batches of at most {self.mixed_buckets[-1:]} tokens (got {num_seqs} "
                             f"sequences, {tokens} tokens); run the model eagerly for the others (check "
                             "can_replay() first)")
        width = attn.block_tables.shape[1]
        if width > self.max_blocks_per_seq:
            raise ValueError(f"block table has {width} blocks per sequence but graphs were captured for "
                             f"{self.max_blocks_per_seq}; pass max_blocks_per_seq >= max_seq_len / block_size")
        if family == "decode":  # one token per sequence, padded up to the batch bucket
            bucket = self.bucket_for(num_seqs)
            self.context_lens[num_seqs:bucket].fill_(0)  # padding rows attend to nothing
        else:  # chunks padded up to the token bucket; each sequence's length is read on the device
            bucket = next(b for b in (self.prefill_buckets if family == "prefill" else self.mixed_buckets)
                          if b >= tokens)
            self.query_start_loc[:num_seqs + 1].copy_(attn.query_start_loc, non_blocking=True)
            if family == "mixed":  # padding sequences: empty queries
                self.query_start_loc[num_seqs + 1:].fill_(tokens)
                self.context_lens[num_seqs:].fill_(0)
        graph, output = self.families[family][bucket]
        self.input_ids[:tokens].copy_(input_ids, non_blocking=True)
        self.positions[:tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:tokens].copy_(attn.slot_mapping, non_blocking=True)
        self.slot_mapping[tokens:bucket].fill_(-1)  # padding rows store nothing
        self.context_lens[:num_seqs].copy_(attn.context_lens, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(attn.block_tables, non_blocking=True)
        graph.replay()
        return output[:tokens]
