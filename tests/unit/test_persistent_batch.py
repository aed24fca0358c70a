"""The persistent batch and asynchronous scheduling: step inputs built from rows equal the layout built from the
sequences, placeholders are fed from the device, and the async engine core generates what one request alone
does, finishing found one step late without an extra token."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from optimum_nvidia_core.attention_metadata import AttentionMetadata, paged_layout
from optimum_nvidia_core.config import EngineConfig
from optimum_nvidia_core.engine.block_manager import BlockManager
from optimum_nvidia_core.engine.input_batch import InputBatch
from optimum_nvidia_core.engine.interface import EngineCoreRequest
from optimum_nvidia_core.engine.scheduler import Scheduler
from optimum_nvidia_core.engine.sequence import Sequence
from optimum_nvidia_core.sampling_params import SamplingParams

BLOCK = 4


def _reference(batch):
    """The step layout built the plain way, from each sequence's own lists."""
    tables = [seq.block_table for seq in batch.seqs]
    q = batch.num_query_tokens
    ctx = [seq.num_computed_tokens + n for seq, n in zip(batch.seqs, q)]
    positions, attn = AttentionMetadata.build(tables, q, ctx, BLOCK)
    ids = [t for seq, n in zip(batch.seqs, q) for t in seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]]
    return ids, positions, attn


def test_rows_give_the_same_inputs_as_the_sequences_through_chunks_preemption_and_new_arrivals():
    rng = random.Random(0)
    bm = BlockManager(24, BLOCK)
    scheduler = Scheduler(max_batch_size=6, max_num_tokens=24, block_manager=bm)
    rows = InputBatch(6, max_blocks_per_seq=20, block_size=BLOCK, max_num_tokens=24, eos_token_ids=[2],
                      device=torch.device("cpu"))
    for i in range(10):
        scheduler.add(Sequence(f"r{i}", [rng.randrange(3, 90) for _ in range(rng.randrange(1, 30))],
                               SamplingParams(max_tokens=rng.randrange(10, 40), ignore_eos=True)))
    preempted = 0
    for _ in range(1000):
        if not scheduler.has_unfinished():
            break
        batch = scheduler.schedule()
        preempted += len(batch.preempted)
        if not batch.seqs:
            continue
        ids, positions, attn = _reference(batch)
        inputs = rows.prepare(batch)
        assert inputs.input_ids.tolist() == ids
        assert torch.equal(inputs.positions, positions)
        assert torch.equal(inputs.attn.slot_mapping, attn.slot_mapping)
        assert torch.equal(inputs.attn.query_start_loc, attn.query_start_loc)
        assert torch.equal(inputs.attn.context_lens, attn.context_lens)
        width = attn.block_tables.shape[1]
        assert torch.equal(inputs.attn.block_tables[:, :width], attn.block_tables)
        assert inputs.sample_index.tolist() == [i for i, s in enumerate(batch.samples) if s]
        sampled = [rng.randrange(3, 90) if s else None for s in batch.samples]
        scheduler.postprocess(batch, sampled)
        rows.landed(-1, inputs.sample_rows, rows.row_seq[inputs.sample_rows],
                    np.array([t for t in sampled if t is not None], dtype=np.int64))
        for seq, token in zip(batch.seqs, sampled):
            if token is not None and seq.check_token_stop(frozenset()) is not None:
                scheduler.finish(seq, "length")
    assert not scheduler.has_unfinished() and preempted > 0  # the pool is small enough to preempt
    assert bm.num_free_blocks == 24


def test_a_placeholder_token_is_read_from_the_last_launched_step_on_the_device():
    bm = BlockManager(16, BLOCK)
    scheduler = Scheduler(4, 16, bm)
    rows = InputBatch(4, 8, BLOCK, 16, [2], torch.device("cpu"))
    seqs = [Sequence(f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True)) for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    first = scheduler.schedule()
    inputs = rows.prepare(first)
    first_rows = inputs.sample_rows
    rows.launched(1, first_rows, torch.tensor([41, 42]))
    scheduler.advance(first)  # placeholders: step 1's tokens are still "on the device"
    second = scheduler.schedule()
    assert second.num_query_tokens == [1, 1] and all(s.num_placeholders == 1 for s in seqs)
    inputs = rows.prepare(second)
    assert inputs.input_ids.tolist() == [41, 42] and inputs.positions.tolist() == [3, 3]
    rows.launched(2, inputs.sample_rows, torch.tensor([51, 52]))
    scheduler.advance(second)
    scheduler.resolve(first, [41, 42])
    rows.landed(1, first_rows, np.array([s.seq_id for s in seqs]), np.array([41, 42]))
    assert [s.token_ids[-1] for s in seqs] == [41, 42] and all(s.num_placeholders == 1 for s in seqs)
    inputs = rows.prepare(scheduler.schedule())
    assert inputs.input_ids.tolist() == [51, 52]  # step 2's, not yet landed


def test_paged_layout_matches_the_block_tables_by_hand():
    tables = np.array([[7, 3, 0], [1, 4, 9]], dtype=np.int32)
    positions, slots, starts = paged_layout(np.array([2, 1]), np.array([6, 9]), tables, 4)
    assert positions.tolist() == [4, 5, 8] and starts.tolist() == [0, 2, 3]
    assert slots.tolist() == [3 * 4 + 0, 3 * 4 + 1, 9 * 4 + 0]


def test_auto_limits_follow_gpu_memory_and_explicit_values_win():
    config = EngineConfig(model="m")
    assert (config.max_batch_size, config.max_num_tokens) == ("auto", "auto")
    h200 = config.with_limits(141 << 30)
    assert (h200.max_batch_size, h200.max_num_tokens) == (1024, 8192)
    h100 = config.with_limits(80 << 30)
    assert (h100.max_batch_size, h100.max_num_tokens) == (512, 8192)
    assert config.with_limits(48 << 30).max_batch_size == 256 and config.with_limits(48 << 30).max_num_tokens == 4096
    assert config.with_limits(24 << 30).max_batch_size == 64 and config.with_limits(24 << 30).max_num_tokens == 2048
    cpu = config.with_limits(None)
    assert (cpu.max_batch_size, cpu.max_num_tokens) == (64, 2048)
    mine = EngineConfig(model="m", max_batch_size=300).with_limits(None)
    assert (mine.max_batch_size, mine.max_num_tokens) == (300, 2048)


# ---- the asynchronous engine core -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def core(tiny_llama_dir):
    from optimum_nvidia_core.engine.core import EngineCore

    return EngineCore(EngineConfig(model=str(tiny_llama_dir), device="cpu", block_size=BLOCK, max_seq_len=96,
                                   max_batch_size=8))


def _run(core, requests):
    """Add (request_id, prompt, params) requests and step until done -> {(request_id, index): (ids, finish)}."""
    for request_id, prompt, params in requests:
        core.add_request(EngineCoreRequest(request_id, prompt, params))
    out = {}
    for _ in range(1000):
        if not core.has_unfinished():
            break
        for o in core.step():
            ids, _ = out.get((o.request_id, o.index), ([], None))
            out[(o.request_id, o.index)] = (ids + o.token_ids, o.finish_reason)
    assert not core.has_unfinished()
    return out


def test_the_next_step_is_launched_before_the_last_is_collected(core):
    calls = []
    launch, collect = core.runner.launch, core.runner.collect
    core.runner.launch = lambda *a, **k: calls.append("launch") or launch(*a, **k)
    core.runner.collect = lambda *a, **k: calls.append("collect") or collect(*a, **k)
    try:
        _run(core, [("a", [5, 6, 7, 8], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))])
    finally:
        del core.runner.launch, core.runner.collect
    assert calls[:3] == ["launch", "launch", "collect"]  # the first token never waits for its own round trip
    assert calls.count("launch") == 4  # max_tokens is known ahead: no step is wasted on a fifth token


def test_batched_async_generation_matches_each_request_alone_and_late_finishes_drop_the_extra_token(core):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randrange(2, 20))] for _ in range(6)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [_run(core, [(f"alone{i}", p, greedy)])[(f"alone{i}", 0)][0] for i, p in enumerate(prompts)]
    # A stop token id that greedy decoding reaches at its 4th token: found when that step lands, one step late.
    stop = alone[0][3]
    first_stop = alone[0].index(stop)
    requests = [(f"b{i}", p, greedy) for i, p in enumerate(prompts)]
    requests[0] = ("b0", prompts[0], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                    stop_token_ids=[stop]))
    together = _run(core, requests)
    assert together[("b0", 0)] == (alone[0][:first_stop + 1], "stop")
    for i in range(1, 6):
        assert together[(f"b{i}", 0)] == (alone[i], "length")
    stats = core.stats()
    assert stats["free_blocks"] == stats["total_blocks"] and stats["running_requests"] == 0


def test_penalized_requests_wait_for_their_tokens_and_match_the_synchronous_result(core):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.5)
    prompt = [9, 10, 11, 9, 10]
    alone = _run(core, [("p", prompt, params)])[("p", 0)][0]
    logits_free = _run(core, [("q", prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))])
    together = _run(core, [("p2", prompt, params), ("q2", prompt, SamplingParams(
        max_tokens=10, temperature=0.0, ignore_eos=True))])
    assert together[("p2", 0)][0] == alone and together[("q2", 0)][0] == logits_free[("q", 0)][0]
    assert len(set(alone)) > 1
