"""The persistent batch: per-sequence state of the running sequences in preallocated numpy rows.

A sequence gets a row when it is first scheduled and keeps it until it is released (finished, aborted, failed or
preempted). Its block table, newest token id and sampling parameters live in the row and are updated by what
changes in a step: rows added and released, block tables that grew, tokens that reached the host. A step's
inputs are then vector operations over the scheduled rows, written into one staging buffer (pinned on CUDA,
two of them taking turns) that is copied to the device in one go.

Asynchronous scheduling: a sequence whose newest token is still on the device (a placeholder) takes it straight
from the last launched step's sampled ids, gathered on the device (``pending``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..attention_metadata import AttentionMetadata, paged_layout
from ..layers.sampling_table import SamplingTable

if TYPE_CHECKING:
    from .scheduler import ScheduledBatch
    from .sequence import Sequence

_ALIGN = 16  # bytes: Triton specializes kernels on pointer alignment; a new one mid-serving costs a compile


@dataclass
class StepInputs:
    """A step's device inputs, and which scheduled sequences sample (k-th sampling row = seqs[sample_index[k]])."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    sample_index: np.ndarray  # [R] int64: indices into the batch of the sequences that sample
    sample_rows: np.ndarray  # [R] int64: their persistent rows
    sample_positions: np.ndarray  # [R] int64: position of the token each samples
    last_token_index: torch.Tensor | None  # [R] int64: each sampler's last query token, None when all tokens sample


class InputBatch:
    def __init__(self, max_rows: int, max_blocks_per_seq: int, block_size: int, max_num_tokens: int,
                 eos_token_ids: list[int], device: torch.device):
        self.max_rows, self.block_size, self.device = max_rows, block_size, device
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_tables = np.zeros((max_rows, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)  # blocks of each row's table written so far
        self.last_token = np.zeros(max_rows, dtype=np.int64)  # newest token id the host knows
        self.row_seq = np.full(max_rows, -1, dtype=np.int64)  # seq_id holding the row, -1 when free
        self.pending = np.full(max_rows, -1, dtype=np.int64)  # index of its in-flight token in device_tokens
        self.pending_step = np.full(max_rows, -1, dtype=np.int64)  # the step that samples that token
        self.sampling = SamplingTable(max_rows)
        self.seqs: list[Sequence | None] = [None] * max_rows
        self._free = list(range(max_rows - 1, -1, -1))
        self.device_tokens: torch.Tensor | None = None  # [R] int64: sampled ids of the last launched step
        self.device_step = -1
        # Staging: one byte buffer per step in flight. Worst case: 3 int64 [T] + int64 [R] + 2 int64 [S] (the
        # device gather) + int32 [S + 1] + int32 [S] + int32 [S, W], each section aligned.
        self._capacity = 8 * (3 * max_num_tokens + 3 * max_rows) + 4 * (2 * max_rows + 1 + max_rows *
                                                                         max_blocks_per_seq) + 8 * _ALIGN
        self._staging: list[torch.Tensor] = []
        self._turn = 0

    # ---- rows --------------------------------------------------------------------------------------------------
    def update(self, batch: "ScheduledBatch") -> np.ndarray:
        """Release the rows of sequences that left, give new ones a row; returns the scheduled rows [S]."""
        for seq in batch.released:
            self.release(seq)
        rows = [seq.row for seq in batch.seqs]
        if None in rows:
            for i, seq in enumerate(batch.seqs):
                if seq.row is None:
                    rows[i] = self._add(seq)
        return np.array(rows, dtype=np.int64)

    def release(self, seq: "Sequence") -> None:
        row = seq.row
        if row is None:
            return
        seq.row = None
        self.row_seq[row] = -1
        self.pending[row] = -1
        self.seqs[row] = None
        self._free.append(row)

    def truncated(self, seq: "Sequence") -> None:
        """seq gave back tail blocks (rejected speculative tokens): its row's table ends where its list does now,
        so blocks it gets later are copied in again."""
        if seq.row is not None:
            self.num_blocks[seq.row] = min(self.num_blocks[seq.row], len(seq.block_table))

    def _add(self, seq: "Sequence") -> int:
        if not self._free:
            self._collect_finished_rows()
        row = self._free.pop()
        seq.row = row
        self.seqs[row] = seq
        self.row_seq[row] = seq.seq_id
        table = seq.block_table
        self.block_tables[row, : len(table)] = table
        self.block_tables[row, len(table):] = 0  # what the row's last holder left
        self.num_blocks[row] = len(table)
        self.last_token[row] = seq.token_ids[-1]
        self.pending[row] = -1
        self.sampling.write(row, seq, self.eos_token_ids)
        return row

    def _collect_finished_rows(self) -> None:
        """Rows of finished sequences whose release did not come through a launched batch."""
        for seq in self.seqs:
            if seq is not None and seq.is_finished:
                self.release(seq)
        if not self._free:
            raise RuntimeError(f"the persistent batch has no free row (max {self.max_rows} running sequences); "
                               "the scheduler must keep at most max_batch_size sequences running")

    def _grow_tables(self, batch: "ScheduledBatch", rows: np.ndarray, ends: np.ndarray) -> None:
        """Copy the blocks each scheduled sequence gained this step (once every block_size tokens)."""
        needed = -(-ends // self.block_size)
        for k in np.flatnonzero(needed > self.num_blocks[rows]).tolist():
            row, table = rows[k], batch.seqs[k].block_table
            have = self.num_blocks[row]
            self.block_tables[row, have: len(table)] = table[have:]
            self.num_blocks[row] = len(table)

    # ---- one step ----------------------------------------------------------------------------------------------
    def prepare(self, batch: "ScheduledBatch") -> StepInputs:
        """The step's inputs, built with vector operations over the scheduled rows and copied to the device once."""
        rows = self.update(batch)
        seqs = batch.seqs
        q = np.array(batch.num_query_tokens, dtype=np.int64)
        samples = np.array(batch.samples, dtype=bool)
        starts = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int64, count=len(seqs))
        ends = starts + q
        self._grow_tables(batch, rows, ends)
        width = int(self.num_blocks[rows].max())
        tables = self.block_tables[rows, :width]
        positions, slots, query_start = paged_layout(q, ends, tables, self.block_size)
        num_tokens, num_seqs = len(positions), len(rows)
        decoding = samples & (q == 1)  # the newest token: from the host row, or from the device
        token_ids = np.empty(num_tokens, dtype=np.int64)
        token_ids[query_start[:-1][decoding]] = self.last_token[rows[decoding]]
        drafts = batch.draft_token_ids
        for k in np.flatnonzero(~decoding).tolist():  # prompt chunks (and verified proposals): on the sequence
            ids = seqs[k].token_ids[starts[k]: ends[k]]
            if drafts is not None and drafts[k]:  # a verify row: its last token, then its proposal
                ids = ids + drafts[k]
            token_ids[query_start[k]: query_start[k + 1]] = ids
        pending = np.flatnonzero(decoding & (self.pending[rows] >= 0))
        if pending.size and not (self.pending_step[rows[pending]] == self.device_step).all():
            raise RuntimeError("a placeholder token refers to a step older than the last launched one; collect "
                               "each step before launching the one after the next")
        sample_index = np.flatnonzero(samples)
        all_sample = num_tokens == num_seqs and sample_index.size == num_seqs
        sections = [
            (token_ids, np.int64), (positions, np.int64), (slots, np.int64),
            (query_start[1:][sample_index] - 1 if not all_sample else None, np.int64),
            (query_start[:-1][pending] if pending.size else None, np.int64),
            (self.pending[rows[pending]] if pending.size else None, np.int64),
            (query_start, np.int32), (ends, np.int32), (tables, np.int32),
        ]
        (ids_t, positions_t, slots_t, last_t, dst_t, src_t, start_t, ctx_t, tables_t) = self._copy(sections)
        if pending.size:  # asynchronous scheduling: the last step's sampled ids, without a host round trip
            ids_t.index_copy_(0, dst_t, self.device_tokens.index_select(0, src_t))
        ends_list = ends.tolist()
        q_list = q.tolist()
        attn = AttentionMetadata(
            slot_mapping=slots_t, query_start_loc=start_t, context_lens=ctx_t,
            block_tables=tables_t.view(num_seqs, width), max_query_len=max(q_list),
            max_context_len=max(ends_list), query_lens_host=q_list, context_lens_host=ends_list,
        )
        return StepInputs(ids_t, positions_t, attn, sample_index, rows[sample_index], ends[sample_index], last_t)

    def _copy(self, sections: list[tuple[np.ndarray | None, type]]) -> list[torch.Tensor | None]:
        """Write the sections into one staging buffer, copy it to the device once, return a view per section."""
        offsets, total = [], 0
        for array, dtype in sections:
            offsets.append(total)
            if array is not None:
                total += -(-array.size * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
        staging = self._staging_buffer(total)
        host = staging.numpy()
        for (array, dtype), offset in zip(sections, offsets):
            if array is not None:
                host[offset: offset + array.size * np.dtype(dtype).itemsize].view(dtype)[:] = array.ravel()
        if self.device.type == "cuda":
            packed = staging[:total].to(self.device, non_blocking=True)
        else:
            packed = staging[:total]  # a fresh buffer each step on the CPU: nothing to copy
        views = []
        for (array, dtype), offset in zip(sections, offsets):
            if array is None:
                views.append(None)
                continue
            nbytes = array.size * np.dtype(dtype).itemsize
            views.append(packed[offset: offset + nbytes].view(torch.int64 if dtype is np.int64 else torch.int32))
        return views

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.empty(nbytes, dtype=torch.uint8)
        if not self._staging:  # two pinned buffers: step N+2 reuses N's once N is collected (its copy is done)
            self._staging = [torch.empty(self._capacity, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self._turn ^= 1
        return self._staging[self._turn]

    # ---- after the step ----------------------------------------------------------------------------------------
    def launched(self, step_id: int, rows: np.ndarray, device_tokens: torch.Tensor) -> None:
        """Step step_id samples `device_tokens` [R] for `rows`: the next step may read them as placeholders."""
        self.device_tokens, self.device_step = device_tokens, step_id
        self.pending[rows] = np.arange(len(rows))
        self.pending_step[rows] = step_id

    def landed(self, step_id: int, rows: np.ndarray, seq_ids: np.ndarray, tokens: np.ndarray) -> None:
        """Step step_id's tokens reached the host: rows still held by the same sequences take them."""
        same = self.row_seq[rows] == seq_ids
        rows, tokens = rows[same], tokens[same]
        self.last_token[rows] = tokens
        self.pending[rows[self.pending_step[rows] == step_id]] = -1
