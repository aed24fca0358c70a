"""Which tokens of which sequences run in the next step.

Each step has a token budget (``max_num_tokens``) and a sequence cap (``max_batch_size``). Running sequences go first,
decodes before prefill chunks; then waiting sequences are admitted while budget and KV blocks last. A long prompt is
split across steps (chunked prefill). When a running sequence needs a block and none is free, the most recently
admitted sequence is preempted by recompute: its blocks are freed and it goes back to the front of the waiting
queue with its generated tokens kept (the prefix cache often gives most of its KV back). A sequence that could not
fit even in an empty cache fails alone with an error instead of blocking everyone. Imports no torch.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from optimum_nvidia_core.engine.block_manager import BlockManager
from optimum_nvidia_core.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work. Sequence i computes tokens [num_computed_tokens, num_computed_tokens + num_query_tokens[i])
    and, if samples[i], a token is sampled from its last position."""

    seqs: list[Sequence] = field(default_factory=list)
    num_query_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # finished this step with an error (can never fit)
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences that gave their blocks back since the last schedule (finished, aborted, failed, preempted): the
    # model runner frees their persistent-batch rows.
    released: list[Sequence] = field(default_factory=list)
    needs_host_tokens: bool = False  # some sequence's next input needs this step's token on the host
    # Speculative decoding (engine/speculation.py): per sequence, the proposed tokens it verifies this step (its
    # query is its last token plus these); None in a plain step.
    draft_token_ids: list[list[int]] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.num_query_tokens)

    def _add(self, seq: Sequence, num_tokens: int, samples: bool) -> None:
        self.seqs.append(seq)
        self.num_query_tokens.append(num_tokens)
        self.samples.append(samples)
        if seq.needs_host_tokens:
            self.needs_host_tokens = True


@dataclass
class SchedulerStats:
    steps: int = 0  # non-empty batches scheduled
    tokens_computed: int = 0  # every token run through the model (recomputation included)
    prompt_tokens_computed: int = 0  # of those, prompt positions
    prefix_cache_hit_tokens: int = 0  # tokens whose KV came from the prefix cache on admission
    preemptions: int = 0


class Scheduler:
    def __init__(self, max_batch_size: int, max_num_tokens: int, block_manager: BlockManager,
                 max_seq_len: int | None = None):
        if max_batch_size < 1 or max_num_tokens < 1:
            raise ValueError(f"need max_batch_size >= 1 and max_num_tokens >= 1, got {max_batch_size}, {max_num_tokens}")
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_seq_len = max_seq_len
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # may hold finished sequences until the next schedule drops them
        self._num_finished_running = 0
        self._by_request: dict[str, list[Sequence]] = {}
        self._released: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        if self.max_seq_len is not None:
            seq.max_num_tokens = min(seq.max_num_tokens, self.max_seq_len)
        self.waiting.append(seq)
        self._by_request.setdefault(seq.request_id, []).append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or len(self.running) > self._num_finished_running

    # -- scheduling ---------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_tokens)
        if not batch.preempted:  # blocks are short: admitting more would only preempt again
            self._schedule_waiting(batch, budget)
        if batch.seqs:
            self.stats.steps += 1
        batch.released, self._released = self._released, []
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        """Running sequences, decodes first, while budget and blocks last; the newest unscheduled one is
        preempted when a block is short. One pass with few attribute reads: it runs for every sequence and step."""
        decodes, prefills, idle = [], [], []
        finished = SequenceStatus.FINISHED
        for seq in self.running:
            if seq.status is finished:
                continue
            num_tokens = len(seq.token_ids) + seq.num_placeholders
            if seq.num_placeholders and (seq.needs_host_tokens or num_tokens >= seq.max_num_tokens):
                idle.append(seq)  # waits for its token: an input the host must see, or its last one
            elif num_tokens - seq.num_computed_tokens == 1:
                decodes.append(seq)
            else:
                prefills.append(seq)
        self._num_finished_running = 0
        queue = decodes + prefills
        next_, end = 0, len(queue)  # queue[next_:end] are still to schedule; preemption takes queue[end - 1]
        scheduled, try_append = [], self.block_manager.try_append
        seqs, query_lens, samples = batch.seqs, batch.num_query_tokens, batch.samples
        max_batch_size = self.max_batch_size
        while next_ < end and budget > 0 and len(scheduled) < max_batch_size:
            seq = queue[next_]
            next_ += 1
            uncomputed = len(seq.token_ids) + seq.num_placeholders - seq.num_computed_tokens
            num_tokens = uncomputed if uncomputed < budget else budget
            fits = try_append(seq, num_tokens)
            while not fits and next_ < end:
                end -= 1
                self._preempt(queue[end], batch)  # newest first; never one already scheduled this step
                fits = try_append(seq, num_tokens)
            if fits:
                scheduled.append(seq)
                seqs.append(seq)
                query_lens.append(num_tokens)
                samples.append(num_tokens == uncomputed)
                if seq.needs_host_tokens:
                    batch.needs_host_tokens = True
                budget -= num_tokens
            elif not scheduled:  # it holds every used block and still does not fit
                self._fail(seq, batch, self._too_big_message(seq))
            else:
                self._preempt(seq, batch)
        self.running = scheduled + queue[next_:end] + idle
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        block_manager = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.num_placeholders:
                break  # preempted with a token in flight: recomputed once its id is known
            if block_manager.blocks_for(seq.num_tokens) > block_manager.num_blocks:
                self.waiting.popleft()
                self._fail(seq, batch, self._too_big_message(seq))
                continue
            cached_prefix = block_manager.find_cached_prefix(seq)
            num_cached = len(cached_prefix) * block_manager.block_size
            num_tokens = min(seq.num_tokens - num_cached, budget)
            if not block_manager.can_allocate(cached_prefix, num_cached + num_tokens):
                break  # FIFO: later arrivals do not overtake the head
            self.waiting.popleft()
            block_manager.allocate(seq, cached_prefix, num_cached + num_tokens)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
            self.stats.prefix_cache_hit_tokens += num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch._add(seq, num_tokens, num_cached + num_tokens == seq.num_tokens)
            budget -= num_tokens

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1
        batch.preempted.append(seq)
        self._released.append(seq)

    def _fail(self, seq: Sequence, batch: ScheduledBatch, message: str) -> None:
        self._retire(seq, "error", message)
        batch.failed.append(seq)

    def _too_big_message(self, seq: Sequence) -> str:
        bm = self.block_manager
        return (
            f"sequence of request {seq.request_id!r} needs {bm.blocks_for(seq.num_tokens)} KV-cache blocks of "
            f"{bm.block_size} tokens ({seq.num_tokens} tokens so far) but the cache has only {bm.num_blocks}; "
            f"raise num_kv_blocks (or GPU memory), or lower max_seq_len / max_tokens"
        )

    # -- after the step -----------------------------------------------------------------------------------------
    def advance(self, batch: ScheduledBatch) -> None:
        """At launch: the step's tokens count as computed, and each sampling sequence gets a placeholder for the
        token the device will sample (asynchronous scheduling: the next step can be scheduled before it lands)."""
        stats = self.stats
        finished = SequenceStatus.FINISHED
        for seq, num_tokens, samples in zip(batch.seqs, batch.num_query_tokens, batch.samples):
            if seq.status is finished:  # aborted since it was scheduled
                continue
            start = seq.num_computed_tokens
            stats.tokens_computed += num_tokens
            if start < seq.num_prompt_tokens:
                stats.prompt_tokens_computed += min(start + num_tokens, seq.num_prompt_tokens) - start
            seq.num_computed_tokens = start + num_tokens
            seq.num_placeholders += samples

    def resolve(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """When the step's tokens reach the host: each replaces its sequence's oldest placeholder (None where
        samples[i] is False). Finishing (end of sequence, lengths) is the engine's call: see finish()."""
        finished = SequenceStatus.FINISHED
        for seq, token_id in zip(batch.seqs, sampled):
            if token_id is not None and seq.status is not finished:
                seq.resolve_placeholder(token_id)

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """advance + resolve, for a step whose tokens are known before the next is scheduled."""
        self.advance(batch)
        self.resolve(batch, sampled)

    def finish(self, seq: Sequence, reason: str = "stop", error: str | None = None) -> None:
        """Take seq out of the queues and free its blocks (they stay in the prefix cache)."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self._num_finished_running += 1  # dropped from self.running by the next schedule
        else:
            self.waiting.remove(seq)
        self._retire(seq, reason, error)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request with reason "abort"; returns them."""
        seqs = [s for s in self._by_request.get(request_id, ()) if not s.is_finished]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def _retire(self, seq: Sequence, reason: str, error: str | None) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        seq.num_placeholders = 0  # a token still in flight is dropped
        self._released.append(seq)
        seqs = self._by_request.get(seq.request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self._by_request[seq.request_id]
