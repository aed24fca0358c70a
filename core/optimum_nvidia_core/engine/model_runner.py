"""Tensors for one engine step: batch layout, paged KV cache, model forward, logits, sampling.

The step's inputs come from the persistent batch (``input_batch``). The CPU path is the reference (plain torch).
On CUDA, decode-only steps replay CUDA graphs captured per batch bucket, prefill chunks and mixed steps of up to
MIXED_GRAPH_TOKENS tokens replay graphs captured per token bucket (``cuda_graph_runner``); larger steps run
eagerly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..attention_metadata import AttentionMetadata
from ..config import EngineConfig
from ..layers.sampler import Sampler, unpack_top_logprobs
from ..layers.token_bitmask import TokenBitmask
from .input_batch import InputBatch, StepInputs
from .scheduler import ScheduledBatch
from .verify_step import unpack_runs, verify

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
    step_id: int = -1
    batch_rows: np.ndarray | None = None  # [R] persistent-batch rows of the sampling sequences
    seq_ids: np.ndarray | None = None  # [R] their seq_ids (a row may change hands before the tokens land)
    verify: bool = False  # a speculative verify step: `tokens` is int64 [R, W + 1] (verify_step.verify)


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
        self.graphs = self._maybe_graphs()
        self.input_batch = InputBatch(config.max_batch_size, self.max_blocks_per_seq, self.block_size,
                                      config.max_num_tokens, eos_token_ids, device)
        self._steps = 0

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
        from .cuda_graph_runner import MIXED_GRAPH_TOKENS

        budget = min(self.config.max_num_tokens, self.max_seq_len)
        graphs = CudaGraphRunner(self.model, self.config.max_batch_size, self.max_blocks_per_seq, self.device,
                                 max_prefill_tokens=budget,
                                 max_mixed_tokens=min(self.config.max_num_tokens, MIXED_GRAPH_TOKENS))
        graphs.capture()
        return graphs

    # ---- one step --------------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The step's device inputs from the persistent batch (see InputBatch.prepare)."""
        return self.input_batch.prepare(batch)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, allowed: TokenBitmask | None = None) -> "LaunchedStep":
        """Queue the step's forward and sampling on the device and return at once; `collect` waits for it. The
        sampled ids stay on the device too, as the next step's input ids of its decoding rows."""
        inputs = self.prepare(batch)
        attn = inputs.attn
        if self.graphs is not None and self.graphs.can_replay(attn):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, attn)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, attn)
        rows = inputs.sample_index.tolist()
        if not rows:
            return LaunchedStep(len(batch.seqs), rows)
        sample_seqs = batch.seqs if len(rows) == len(batch.seqs) else [batch.seqs[i] for i in rows]
        if batch.draft_token_ids is not None:  # speculative: [R, W + 1] runs and their lengths (verify_step)
            tokens, sampled = verify(self, hidden, inputs, batch, rows, sample_seqs, allowed)
            top_logprobs, num_logprobs = None, ()
        else:
            logits = self.compute_logits(hidden, inputs, rows, sample_seqs)
            sampling = self.input_batch.sampling.batch(inputs.sample_rows, inputs.sample_positions, sample_seqs,
                                                       logits.device, token_bitmask=allowed)
            out = self.sampler(logits, sampling)
            # [R], -1 where a row's logits are not all finite (a row sum is NaN or inf then; one reduction)
            tokens = torch.where(logits.sum(dim=-1).isfinite(), out.token_ids, -1)
            sampled, top_logprobs, num_logprobs = out.token_ids, out.top_logprobs, sampling.num_logprobs
        self._steps += 1
        self.input_batch.launched(self._steps, inputs.sample_rows, sampled)
        if top_logprobs is not None:  # one copy for both: the tokens ride in column 0 (exact in float64)
            tokens = torch.cat([tokens[:, None].double(), top_logprobs], dim=1)
        step = LaunchedStep(len(batch.seqs), rows, tokens, num_logprobs, step_id=self._steps,
                            batch_rows=inputs.sample_rows, seq_ids=self.input_batch.row_seq[inputs.sample_rows],
                            verify=batch.draft_token_ids is not None)
        if tokens.is_cuda:  # copy into pinned memory behind the step; collect() waits on the event
            step.tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            step.tokens.copy_(tokens, non_blocking=True)
            step.done = torch.cuda.Event()
            step.done.record()
        return step

    def collect(self, step: "LaunchedStep") -> tuple[list[int | None], list[dict[int, float] | None]]:
        """Wait for a launched step (the one host sync of a step). Returns, per scheduled sequence, the sampled
        token (None while its prefill is unfinished, -1 when its logits were not finite) and its top
        log-probabilities when asked for."""
        if not step.rows:
            return [None] * step.num_seqs, [None] * step.num_seqs
        if step.done is not None:
            step.done.synchronize()
        values = step.tokens.numpy()
        top: list = [None] * len(step.rows)
        if step.verify:  # each row's run of tokens (verify_step), its last token the row's newest
            token_list, last = unpack_runs(values)
            self.input_batch.landed(step.step_id, step.batch_rows, step.seq_ids, last)
            return self._per_seq(step, token_list, top)
        if values.ndim == 2:  # logprobs asked for: the token in column 0, the packed top-k after it
            top = unpack_top_logprobs(values.tolist(), step.num_logprobs, first=1)
            values = values[:, 0].astype(np.int64)
        self.input_batch.landed(step.step_id, step.batch_rows, step.seq_ids, values)
        return self._per_seq(step, values.tolist(), top)

    @staticmethod
    def _per_seq(step: "LaunchedStep", token_list: list, top: list) -> tuple[list, list]:
        """Per sampling row -> per scheduled sequence (None where it did not sample)."""
        if len(step.rows) == step.num_seqs:  # every scheduled sequence sampled (decode steps)
            return token_list, list(top)
        sampled: list = [None] * step.num_seqs
        top_all: list[dict[int, float] | None] = [None] * step.num_seqs
        for k, i in enumerate(step.rows):
            sampled[i], top_all[i] = token_list[k], top[k]
        return sampled, top_all

    def release(self, seqs: list) -> None:
        """Free the persistent-batch rows of sequences that left (for a schedule that launched nothing)."""
        for seq in seqs:
            self.input_batch.release(seq)

    def compute_logits(self, hidden: torch.Tensor, inputs: StepInputs, rows: list[int], seqs: list) -> torch.Tensor:
        """Logits [R, V] (float32) of the sampled rows' last positions (rows: batch indices of the sequences
        `seqs` that sample). (Tests override it to inject faults.)"""
        return self.model.compute_logits(self._last_hidden(hidden, inputs))

    def _last_hidden(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """hidden [T, H] -> [R, H]: the last query token of each sampled sequence."""
        if inputs.last_token_index is None:
            return hidden  # one token per sequence, all sampled: nothing to gather
        return hidden.index_select(0, inputs.last_token_index)

