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

from ..layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch_size (always included): padding wastes at most 15 rows."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_blocks_per_seq: int,
                 device: torch.device):
        self.model = model
        self.device = device
        self.buckets = batch_buckets(max_batch_size)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> static hidden [bucket, H] the graph writes
        size = self.buckets[-1]
        as_int = dict(device=device)
        self.input_ids = torch.zeros(size, dtype=torch.int64, **as_int)
        self.positions = torch.zeros(size, dtype=torch.int64, **as_int)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, **as_int)
        self.context_lens = torch.zeros(size, dtype=torch.int32, **as_int)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, **as_int)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, **as_int)

    def _metadata(self, batch: int) -> AttentionMetadata:
        """Views of the static buffers for one bucket. max_context_len is the largest context a sequence can
        have, so the attention kernels are captured with enough partitions for any replay."""
        block_size = self.model.attention_layers()[0].k_cache.shape[1]
        max_context = self.max_blocks_per_seq * block_size
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], query_start_loc=self.query_start_loc[:batch + 1],
            context_lens=self.context_lens[:batch], block_tables=self.block_tables[:batch],
            max_query_len=1, max_context_len=max_context,
            query_lens_host=[1] * batch, context_lens_host=[0] * batch,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket. On failure (e.g. a layer without a CUDA kernel that syncs with the host)
        log why and keep none, so every step runs eagerly."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        try:
            for batch in reversed(self.buckets):
                attn = self._metadata(batch)
                ids, positions = self.input_ids[:batch], self.positions[:batch]
                self.model(ids, positions, attn)  # warm-up: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[batch] = self.model(ids, positions, attn)
                self.graphs[batch] = graph
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
            logger.warning("CUDA graph capture failed (%s: %s); decode runs eagerly. Set enforce_eager=True to "
                           "skip the attempt.", type(error).__name__, error)
            self.graphs.clear()
            self.outputs.clear()
            return
        torch.cuda.synchronize(self.device)
        logger.info("captured %d CUDA graphs (batch sizes %s) in %.1f s", len(self.graphs), self.buckets,
                    time.perf_counter() - start)

    def fits(self, num_seqs: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.buckets[-1]

    def bucket_for(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """A decode-only step: input_ids [S], positions [S] -> hidden [S, H]. The result is a view of the graph's
        output buffer: use it before the next `run`."""
        if not attn.is_decode_only or not self.fits(attn.num_seqs):
            raise ValueError(f"CudaGraphRunner.run takes decode-only batches of at most {self.buckets[-1]} "
                             f"sequences (got {attn.num_seqs}, max_query_len={attn.max_query_len}); run the model "
                             "eagerly for the others (check fits() first)")
        num_seqs = attn.num_seqs
        batch = self.bucket_for(num_seqs)
        width = attn.block_tables.shape[1]
        if width > self.max_blocks_per_seq:
            raise ValueError(f"block table has {width} blocks per sequence but graphs were captured for "
                             f"{self.max_blocks_per_seq}; pass max_blocks_per_seq >= max_seq_len / block_size")
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(attn.slot_mapping, non_blocking=True)
        self.context_lens[:num_seqs].copy_(attn.context_lens, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(attn.block_tables, non_blocking=True)
        if batch > num_seqs:  # padding rows: store nothing, attend to nothing
            self.slot_mapping[num_seqs:batch].fill_(-1)
            self.context_lens[num_seqs:batch].fill_(0)
        self.graphs[batch].replay()
        return self.outputs[batch][:num_seqs]
