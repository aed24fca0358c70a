"""Scheduler: token budget, chunked prefill, preemption by recompute, prefix reuse, abort, no deadlock.

A small simulator plays the model: every step it writes each scheduled token id into a fake paged KV cache at the
sequence's slot, checks every sequence reads its own tokens back through its block table, and "samples" a token that
is a hash of the context it read from the cache. A block-table bug therefore changes the outputs.
"""
import zlib

from optimum_nvidia_core.engine.block_manager import BlockManager
from optimum_nvidia_core.engine.scheduler import Scheduler
from optimum_nvidia_core.engine.sequence import Sequence, SequenceStatus
from optimum_nvidia_core.sampling_params import SamplingParams


class CacheSimulator:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        bm = scheduler.block_manager
        self.block_size = bm.block_size
        self.slots = [None] * (bm.num_blocks * bm.block_size)
        self.finished: dict[int, Sequence] = {}
        self.batches = []

    def slot(self, seq, pos):
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def step(self):
        batch = self.scheduler.schedule()
        self.batches.append(batch)
        for seq in batch.failed:
            self.finished[seq.seq_id] = seq
        for seq, q in zip(batch.seqs, batch.num_query_tokens):  # every layer writes the whole step's KV first
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + q):
                self.slots[self.slot(seq, pos)] = seq.token_ids[pos]
        sampled = []
        for seq, q, sample in zip(batch.seqs, batch.num_query_tokens, batch.samples):
            end = seq.num_computed_tokens + q
            context = [self.slots[self.slot(seq, pos)] for pos in range(end)]
            assert context == seq.token_ids[:end], f"{seq} reads another sequence's KV"
            sampled.append(zlib.crc32(repr(context).encode()) % 1000 if sample else None)
        self.scheduler.postprocess(batch, sampled)
        for seq, sample in zip(batch.seqs, batch.samples):
            if sample and seq.check_token_stop(frozenset()) is not None:
                self.scheduler.finish(seq, "length")
                self.finished[seq.seq_id] = seq
        return batch

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()
        raise AssertionError("scheduler did not finish: deadlock or livelock")


def make_scheduler(num_blocks=64, block_size=4, max_batch_size=8, max_num_tokens=32, prefix_caching=True):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(max_batch_size, max_num_tokens, bm)


def make_seqs(lengths, max_tokens=6, base=0):
    return [
        Sequence(f"r{i}", [(base + i * 31 + t) % 997 for t in range(n)], SamplingParams(max_tokens=max_tokens))
        for i, n in enumerate(lengths)
    ]


def generate(lengths, **kwargs):
    scheduler = make_scheduler(**kwargs)
    seqs = make_seqs(lengths)
    for seq in seqs:
        scheduler.add(seq)
    sim = CacheSimulator(scheduler)
    sim.run()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks, "blocks leaked"
    return [seq.output_token_ids for seq in seqs], scheduler, sim


def test_budget_and_batch_size_are_respected_and_long_prompts_are_chunked():
    outputs, scheduler, sim = generate([3, 50, 7, 90, 2, 11], max_batch_size=3, max_num_tokens=16)
    for batch in sim.batches:
        assert batch.num_tokens <= 16 and len(batch.seqs) <= 3
    assert all(len(out) == 6 for out in outputs)
    chunks_of_long = [q for b in sim.batches for s, q in zip(b.seqs, b.num_query_tokens) if s.request_id == "r3"]
    assert len(chunks_of_long) > 6 and sum(chunks_of_long) >= 90  # split across steps
    assert scheduler.stats.prompt_tokens_computed == 3 + 50 + 7 + 90 + 2 + 11


def test_decodes_are_scheduled_before_prefill_chunks():
    scheduler = make_scheduler(max_num_tokens=8)
    short, long = make_seqs([2, 40])
    scheduler.add(short)
    sim = CacheSimulator(scheduler)
    sim.step()  # short prefills and samples its first token
    scheduler.add(long)
    batch = sim.step()
    assert batch.seqs[0] is short and batch.num_query_tokens == [1, 7]
    assert batch.samples == [True, False]


def test_outputs_do_not_depend_on_budget_batch_size_or_block_size():
    lengths = [5, 17, 1, 33, 8, 9, 12, 40]
    reference, _, _ = generate(lengths, max_batch_size=1, max_num_tokens=64, num_blocks=64)
    for kwargs in [dict(max_batch_size=8, max_num_tokens=16), dict(max_batch_size=4, max_num_tokens=7, block_size=1,
                   num_blocks=400), dict(max_batch_size=8, max_num_tokens=64, block_size=16, num_blocks=16)]:
        assert generate(lengths, **kwargs)[0] == reference


def test_preemption_when_blocks_run_out_completes_everything_identically():
    lengths = [10, 14, 9, 12, 11, 13]
    reference, _, _ = generate(lengths, num_blocks=200)
    outputs, scheduler, sim = generate(lengths, num_blocks=12, max_num_tokens=64)  # 6 seqs * 4-5 blocks > 12
    assert outputs == reference
    assert scheduler.stats.preemptions > 0
    assert any(batch.preempted for batch in sim.batches)


def test_preemption_without_prefix_cache_recomputes_generated_tokens():
    lengths = [10, 14, 9, 12]
    reference, _, _ = generate(lengths, num_blocks=200, prefix_caching=False)
    outputs, scheduler, _ = generate(lengths, num_blocks=8, prefix_caching=False)
    assert outputs == reference and scheduler.stats.preemptions > 0
    assert scheduler.stats.tokens_computed > sum(lengths) + 6 * len(lengths) - len(lengths)


def test_second_request_with_shared_prefix_computes_only_its_new_tokens():
    scheduler = make_scheduler(num_blocks=128, block_size=16, max_num_tokens=512)
    prefix = [(7 * t) % 991 for t in range(200)]
    sim = CacheSimulator(scheduler)
    first = Sequence("a", prefix + [1, 2, 3], SamplingParams(max_tokens=4))
    scheduler.add(first)
    sim.run()
    before = scheduler.stats.prompt_tokens_computed
    assert before == 203
    second = Sequence("b", prefix + [4, 5, 6, 7, 8], SamplingParams(max_tokens=4))
    scheduler.add(second)
    sim.run()
    assert second.num_cached_tokens == 192  # 12 full blocks of the 200-token prefix
    assert scheduler.stats.prompt_tokens_computed - before == 205 - 192
    assert scheduler.stats.prefix_cache_hit_tokens == 192


def test_n_completions_admitted_together_share_the_prompt_blocks():
    scheduler = make_scheduler(num_blocks=64, block_size=4, max_num_tokens=256)
    params = SamplingParams(n=4, max_tokens=3)
    seqs = [Sequence("r", list(range(40)), params, index=i) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    batch = CacheSimulator(scheduler).step()
    assert batch.num_query_tokens == [40, 4, 4, 4]  # the first computes the prompt; the others its last block
    assert all(s.block_table[:9] == seqs[0].block_table[:9] for s in seqs)
    assert len({seq.seed for seq in seqs}) == 4


def test_a_sequence_that_can_never_fit_fails_alone():
    scheduler = make_scheduler(num_blocks=6, block_size=4)
    small, huge, small2 = make_seqs([5, 30, 6])  # 30 tokens need 8 blocks > 6
    for seq in (small, huge, small2):
        scheduler.add(seq)
    sim = CacheSimulator(scheduler)
    sim.run()
    assert huge.finish_reason == "error" and "raise num_kv_blocks" in huge.error
    assert [s for b in sim.batches for s in b.failed] == [huge]
    assert small.finish_reason == small2.finish_reason == "length"


def test_a_sequence_outgrowing_the_whole_cache_while_decoding_fails_instead_of_hanging():
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    seq = Sequence("r", list(range(10)), SamplingParams(max_tokens=20))
    scheduler.add(seq)
    CacheSimulator(scheduler).run()
    assert seq.finish_reason == "error" and seq.num_computed_tokens == 12  # 3 blocks of 4
    assert scheduler.block_manager.num_free_blocks == 3


def test_abort_frees_blocks_of_running_and_waiting_sequences():
    scheduler = make_scheduler(num_blocks=32, max_batch_size=2)
    seqs = make_seqs([9, 9, 9])
    seqs[2].request_id = "r0"  # two sequences of one request, one of them still waiting
    for seq in seqs:
        scheduler.add(seq)
    CacheSimulator(scheduler).step()
    assert seqs[2].status is SequenceStatus.WAITING
    aborted = scheduler.abort("r0")
    assert set(aborted) == {seqs[0], seqs[2]} and all(s.finish_reason == "abort" for s in aborted)
    scheduler.finish(seqs[1], "stop")
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == 32


def test_postprocess_skips_a_sequence_aborted_during_the_step():
    scheduler = make_scheduler()
    (seq,) = make_seqs([5])
    scheduler.add(seq)
    batch = scheduler.schedule()
    scheduler.abort("r0")
    scheduler.postprocess(batch, [42])
    assert seq.num_tokens == 5 and scheduler.block_manager.num_free_blocks == 64


def test_counters():
    _, scheduler, _ = generate([4, 4])
    stats = scheduler.stats
    assert stats.steps == 6 and stats.preemptions == 0 and stats.prefix_cache_hit_tokens == 0
    assert stats.tokens_computed == 8 + 2 * 5 and stats.prompt_tokens_computed == 8


def test_placeholders_count_as_tokens_and_lengths_are_known_ahead():
    """Asynchronous scheduling: a launched step's tokens are placeholders until they land; a sequence that needs
    its newest token on the host (a penalty) waits for it, and one whose in-flight tokens reach max_tokens is not
    scheduled again."""
    scheduler = make_scheduler()
    seq = Sequence("r", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    penalized = Sequence("p", [4, 5], SamplingParams(max_tokens=5, repetition_penalty=1.2))
    scheduler.add(seq)
    scheduler.add(penalized)
    first = scheduler.schedule()
    scheduler.advance(first)
    assert seq.num_tokens == 4 and seq.token_ids == [1, 2, 3] and seq.num_uncomputed_tokens == 1
    second = scheduler.schedule()
    assert second.seqs == [seq] and not second.needs_host_tokens  # the penalized one waits for its token
    scheduler.advance(second)
    assert scheduler.schedule().seqs == []  # two tokens in flight reach max_tokens: no third step
    scheduler.resolve(first, [7, 8])
    assert scheduler.schedule().seqs == [penalized]  # its token landed: it runs again
    scheduler.resolve(second, [9])
    assert seq.token_ids == [1, 2, 3, 7, 9] and seq.check_token_stop(frozenset()) == "length"
    assert penalized.token_ids == [4, 5, 8]
