"""Tensors for one engine step: batch layout, paged KV cache, model forward, logits, sampling.

The CPU path is the reference (plain torch). On CUDA, decode-only steps replay CUDA graphs captured per batch
bucket and one sequence's prefill chunk replays a graph captured per token bucket (``cuda_graph_runner``); mixed
batches run eagerly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..attention_metadata import AttentionMetadata
from ..config import EngineConfig
from ..layers.sampler import Sampler, SamplingBatch, unpack_top_logprobs
from ..layers.token_bitmask import TokenBitmask
from .scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A step queued on the device: which scheduled rows sample, and their tokens once `done` has fired."""

    num_seqs: int
    rows: list[int]  # indices (into the batch) of the sequences that sample
    # On the host (pinned, filled asynchronously on CUDA): int64 [R] tokens, or with logprobs float64 [R, 1 + P]:
    # the token, then the sampler's packed top log-probabilities; one device->host copy either way.
    tokens: torch.Tensor | None = None
    num_logprobs: tuple[int | None, ...] = ()
    done: torch.cuda.Event | None = None  # CUDA: fires when `tokens` is filled


CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on the CPU
GPU_ACTIVATION_RESERVE = 2 << 30  # kept free for prefill activations and graphs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 max_seq_len: int, eos_token_ids: list[int]):
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.block_size = config.block_size
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = math.ceil(max_seq_len / self.block_size)
        self.eos_token_ids = eos_token_ids
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else dtype
        self.num_blocks = config.num_kv_blocks or self._blocks_that_fit()
        self._allocate_kv_cache()
        self.sampler = Sampler()
        if device.type == "cuda" and hasattr(model, "fuse_fp8_input_quantization"):
            model.fuse_fp8_input_quantization()
        self.graphs = self._maybe_graphs()

    # ---- set-up ----------------------------------------------------------------------------------------
    def _kv_bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * elem

    def _blocks_that_fit(self) -> int:
        per_block = self._kv_bytes_per_block()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # memory cached from an earlier engine is free to us
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.gpu_memory_utilization - used - GPU_ACTIVATION_RESERVE
        else:
            budget = CPU_KV_CACHE_BYTES
        wanted = self.config.max_batch_size * self.max_blocks_per_seq  # never more than all sequences can use
        blocks = min(int(budget // per_block), wanted)
        if blocks < self.max_blocks_per_seq:
            raise MemoryError(
                f"the KV cache fits only {blocks} blocks of {self.block_size} tokens, fewer than one sequence of "
                f"max_seq_len needs ({self.max_blocks_per_seq}); lower max_seq_len, use kv_cache_dtype='fp8' or "
                "use_fp8=True, or raise gpu_memory_utilization")
        return blocks

    def _allocate_kv_cache(self) -> None:
        for layer in self.model.attention_layers():
            shape = (self.num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    def _maybe_graphs(self):
        if self.device.type != "cuda" or self.config.enforce_eager:
            return None
        try:
            from .cuda_graph_runner import CudaGraphRunner
        except ImportError:
            return None
        graphs = CudaGraphRunner(self.model, self.config.max_batch_size, self.max_blocks_per_seq, self.device,
                                 max_prefill_tokens=min(self.config.max_num_tokens, self.max_seq_len))
        graphs.capture()
        return graphs

    # ---- one step --------------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the scheduled chunks: input_ids [T], positions [T], and the attention layout. Every integer
        goes into ONE host tensor (pinned on CUDA) and ONE host->device copy; the int32 parts are cast with one
        device kernel. Several small copies cost more host time than the data they move."""
        bs = self.block_size
        ids, positions, slots, starts, ctx_lens, q_lens, tables = [], [], [], [0], [], [], []
        for seq, q in zip(batch.seqs, batch.num_query_tokens):
            begin, end, table = seq.num_computed_tokens, seq.num_computed_tokens + q, seq.block_table
            if q == 1:  # decode: one token, no slices or generators
                ids.append(seq.token_ids[begin])
                positions.append(begin)
                slots.append(table[begin // bs] * bs + begin % bs)
            else:
                ids.extend(seq.token_ids[begin:end])
                positions.extend(range(begin, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            starts.append(starts[-1] + q)
            ctx_lens.append(end)
            q_lens.append(q)
            tables.append(table)
        width = max(len(t) for t in tables)
        flat_tables = []
        for table in tables:
            flat_tables.extend(table)
            flat_tables.extend([0] * (width - len(table)))
        num_tokens, num_seqs = len(ids), len(q_lens)
        # Every section starts 16 bytes apart (padding to 2 int64 / 4 int32): Triton specializes kernels on the
        # alignment of their pointers, and a new alignment mid-serving costs a ~1 s compile.
        t_pad, s_pad = _round_up(num_tokens, 2), _round_up(num_seqs + 1, 4)
        pad64 = [0] * (t_pad - num_tokens)
        starts += [0] * (s_pad - num_seqs - 1)
        ctx_section = ctx_lens + [0] * (s_pad - num_seqs)
        host = torch.tensor(ids + pad64 + positions + pad64 + slots + pad64 + starts + ctx_section + flat_tables,
                            dtype=torch.int64, pin_memory=self.device.type == "cuda")
        packed = host.to(self.device, non_blocking=True)
        input_ids, positions_t, slot_mapping = packed[: 3 * t_pad].view(3, t_pad)[:, :num_tokens].unbind(0)
        as_int32 = packed[3 * t_pad:].to(torch.int32)  # starts [S+1], context lens [S], tables [S*W], padded
        attn = AttentionMetadata(
            slot_mapping=slot_mapping, query_start_loc=as_int32[: num_seqs + 1],
            context_lens=as_int32[s_pad: s_pad + num_seqs],
            block_tables=as_int32[2 * s_pad:].view(num_seqs, width),
            max_query_len=max(q_lens), max_context_len=max(ctx_lens), query_lens_host=q_lens,
            context_lens_host=ctx_lens,
        )
        return input_ids, positions_t, attn

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, allowed: TokenBitmask | None = None) -> "LaunchedStep":
        """Queue the step's forward and sampling on the device and return at once; `collect` waits for it. The
        engine does the previous step's host work (detokenizing, streaming) while the device runs this one."""
        input_ids, positions, attn = self.prepare(batch)
        if self.graphs is not None and self.graphs.can_replay(attn):
            hidden = self.graphs.run(input_ids, positions, attn)
        else:
            hidden = self.model(input_ids, positions, attn)
        rows = [i for i, s in enumerate(batch.samples) if s]
        if not rows:
            return LaunchedStep(len(batch.seqs), rows)
        sample_seqs = [batch.seqs[i] for i in rows]
        logits = self.compute_logits(hidden, attn, rows, sample_seqs)
        sampling = SamplingBatch.build(sample_seqs, logits.device, self.eos_token_ids, token_bitmask=allowed)
        out = self.sampler(logits, sampling)
        tokens = torch.where(torch.isfinite(logits).all(dim=-1), out.token_ids, -1)  # [R], -1: not finite
        if out.top_logprobs is not None:  # one copy for both: the tokens ride in column 0 (exact in float64)
            tokens = torch.cat([tokens[:, None].double(), out.top_logprobs], dim=1)
        if tokens.is_cuda:  # copy into pinned memory behind the step; collect() waits on the event
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return LaunchedStep(len(batch.seqs), rows, host, sampling.num_logprobs, done)
        return LaunchedStep(len(batch.seqs), rows, tokens, sampling.num_logprobs)

    def collect(self, step: "LaunchedStep") -> tuple[list[int | None], list[dict[int, float] | None]]:
        """Wait for a launched step (the one host sync of a step). Returns, per scheduled sequence, the sampled
        token (None while its prefill is unfinished, -1 when its logits were not finite) and its top
        log-probabilities when asked for."""
        sampled: list[int | None] = [None] * step.num_seqs
        top: list[dict[int, float] | None] = [None] * step.num_seqs
        if not step.rows:
            return sampled, top
        if step.done is not None:
            step.done.synchronize()
        values = step.tokens.tolist()
        if step.tokens.dim() == 1:
            for i, token in zip(step.rows, values):
                sampled[i] = token
            return sampled, top
        for i, row, logprobs in zip(step.rows, values, unpack_top_logprobs(values, step.num_logprobs, first=1)):
            sampled[i] = int(row[0])
            top[i] = logprobs
        return sampled, top

    def compute_logits(self, hidden: torch.Tensor, attn: AttentionMetadata, rows: list[int],
                       seqs: list) -> torch.Tensor:
        """Logits [R, V] (float32) of the sampled rows' last positions. (Tests override it to inject faults.)"""
        return self.model.compute_logits(self._last_hidden(hidden, attn, rows))

    def _last_hidden(self, hidden: torch.Tensor, attn: AttentionMetadata, rows: list[int]) -> torch.Tensor:
        """hidden [T, H] -> [R, H]: the last query token of each sampled sequence (rows)."""
        if attn.is_decode_only and len(rows) == attn.num_seqs:
            return hidden  # one token per sequence, all sampled: nothing to gather
        ends, end = [], 0
        for q in attn.query_lens_host:
            end += q
            ends.append(end - 1)
        index = torch.tensor([ends[i] for i in rows], dtype=torch.int64).to(hidden.device, non_blocking=True)
        return hidden[index]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
