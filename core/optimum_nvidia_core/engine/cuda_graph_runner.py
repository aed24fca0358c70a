"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a 7B model launches a few hundred small kernels; launched one by one from Python, the gaps
between them cost as much as the work. A CUDA graph records the whole forward once per bucket and replays it
with one launch. Graphs replay fixed addresses, so every input lives in a static buffer that `run` fills:
input_ids, positions, slot_mapping, context_lens, block_tables (query_start_loc is fixed: one token each).
A batch is padded up to its bucket; padding rows have slot -1 (nothing stored) and context 0 (zeros out).
All graphs share one memory pool, captured largest first so the smaller ones reuse its blocks.

Only the model forward is captured; logits and sampling run eagerly on the rows that sample. Batches larger
than the largest bucket, prefills and mixed steps run eagerly (ModelRunner decides with `fits`).
"""
from __future__ import annotations

import logging
import time

import torch

from ..attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch_size (always included): padding wastes at most 15 rows."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
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
                 device: torch.device, max_prefill_tokens: int = 0):
        self.model = model
        self.device = device
        self.buckets = batch_buckets(max_batch_size)
        self.prefill_buckets = token_buckets(max_prefill_tokens) if max_prefill_tokens > 1 else []
        self.max_blocks_per_seq = max_blocks_per_seq
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> static hidden [bucket, H] the graph writes
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_outputs: dict[int, torch.Tensor] = {}  # token bucket -> static hidden [bucket, H]
        size = max([self.buckets[-1]] + self.prefill_buckets)
        as_int = dict(device=device)
        self.input_ids = torch.zeros(size, dtype=torch.int64, **as_int)
        self.positions = torch.zeros(size, dtype=torch.int64, **as_int)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, **as_int)
        self.context_lens = torch.zeros(self.buckets[-1], dtype=torch.int32, **as_int)
        self.block_tables = torch.zeros(self.buckets[-1], max_blocks_per_seq, dtype=torch.int32, **as_int)
        self.query_start_loc = torch.arange(self.buckets[-1] + 1, dtype=torch.int32, **as_int)
        self.prefill_query_start_loc = torch.zeros(2, dtype=torch.int32, **as_int)  # [0, T]: T read on device

    def _metadata(self, batch: int) -> AttentionMetadata:
        """Views of the static buffers for one decode bucket. max_context_len is the largest context a sequence
        can have, so the attention kernels are captured with enough partitions for any replay."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], query_start_loc=self.query_start_loc[:batch + 1],
            context_lens=self.context_lens[:batch], block_tables=self.block_tables[:batch],
            max_query_len=1, max_context_len=self._max_context(),
            query_lens_host=[1] * batch, context_lens_host=[0] * batch,
        )

    def _prefill_metadata(self, tokens: int) -> AttentionMetadata:
        """One sequence, `tokens` query rows (its real length is read from prefill_query_start_loc)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens], query_start_loc=self.prefill_query_start_loc,
            context_lens=self.context_lens[:1], block_tables=self.block_tables[:1],
            max_query_len=tokens, max_context_len=self._max_context(),
            query_lens_host=[tokens], context_lens_host=[0],
        )

    def _max_context(self) -> int:
        return self.max_blocks_per_seq * self.model.attention_layers()[0].k_cache.shape[1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket. On failure (e.g. a layer without a CUDA kernel that syncs with the host)
        log why and keep none, so every step runs eagerly."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        try:
            for tokens in reversed(self.prefill_buckets):
                self.prefill_graphs[tokens], self.prefill_outputs[tokens] = self._capture_one(
                    tokens, self._prefill_metadata(tokens), pool)
            for batch in reversed(self.buckets):
                self.graphs[batch], self.outputs[batch] = self._capture_one(batch, self._metadata(batch), pool)
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
            logger.warning("CUDA graph capture failed (%s: %s); the model runs eagerly. Set enforce_eager=True "
                           "to skip the attempt.", type(error).__name__, error)
            for table in (self.graphs, self.outputs, self.prefill_graphs, self.prefill_outputs):
                table.clear()
            return
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode graphs (batch sizes %s) and %d prefill graphs (tokens %s) in %.1f s",
                    len(self.graphs), self.buckets, len(self.prefill_graphs), self.prefill_buckets,
                    time.perf_counter() - start)

    def _capture_one(self, rows: int, attn: AttentionMetadata, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        ids, positions = self.input_ids[:rows], self.positions[:rows]
        self.model(ids, positions, attn)  # warm-up: Triton compiles, the FP8 tuner and cuBLAS pick kernels
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = self.model(ids, positions, attn)
        return graph, output

    def fits(self, num_seqs: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.buckets[-1]

    def can_replay(self, attn: AttentionMetadata) -> bool:
        """A decode-only batch that fits a bucket, or one sequence's prefill chunk that fits a token bucket."""
        if attn.is_decode_only:
            return self.fits(attn.num_seqs)
        return attn.num_seqs == 1 and bool(self.prefill_graphs) and attn.max_query_len <= self.prefill_buckets[-1]

    def bucket_for(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, H] for a batch that `can_replay`. The result is a view of
        the graph's output buffer: use it before the next `run`."""
        if not self.can_replay(attn):
            raise ValueError(f"CudaGraphRunner.run takes decode-only batches of at most {self.buckets[-1]} "
                             f"sequences or one sequence's prefill of at most {self.prefill_buckets[-1:]} tokens "
                             f"(got {attn.num_seqs} sequences, max_query_len={attn.max_query_len}); run the model "
                             "eagerly for the others (check can_replay() first)")
        width = attn.block_tables.shape[1]
        if width > self.max_blocks_per_seq:
            raise ValueError(f"block table has {width} blocks per sequence but graphs were captured for "
                             f"{self.max_blocks_per_seq}; pass max_blocks_per_seq >= max_seq_len / block_size")
        tokens, num_seqs = input_ids.shape[0], attn.num_seqs
        if attn.is_decode_only:  # one token per sequence, padded up to the batch bucket
            bucket = self.bucket_for(num_seqs)
            graph, output = self.graphs[bucket], self.outputs[bucket]
            self.context_lens[num_seqs:bucket].fill_(0)  # padding rows attend to nothing
        else:  # one sequence's chunk, padded up to the token bucket; its length is read on the device
            bucket = next(b for b in self.prefill_buckets if b >= tokens)
            graph, output = self.prefill_graphs[bucket], self.prefill_outputs[bucket]
            self.prefill_query_start_loc.copy_(attn.query_start_loc, non_blocking=True)
        self.input_ids[:tokens].copy_(input_ids, non_blocking=True)
        self.positions[:tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:tokens].copy_(attn.slot_mapping, non_blocking=True)
        self.slot_mapping[tokens:bucket].fill_(-1)  # padding rows store nothing
        self.context_lens[:num_seqs].copy_(attn.context_lens, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(attn.block_tables, non_blocking=True)
        graph.replay()
        return output[:tokens]
