"""BlockManager: ref counts, hash-chained prefix reuse of full blocks, LRU eviction of cached blocks."""
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_nvidia_core.engine.block_manager import BlockManager
from optimum_nvidia_core.engine.sequence import Sequence
from optimum_nvidia_core.sampling_params import SamplingParams

CORE = Path(__file__).resolve().parents[2] / "core" / "optimum_nvidia_core"


def make_seq(tokens, request_id="r"):
    return Sequence(request_id, list(tokens), SamplingParams(max_tokens=8))


def admit(bm: BlockManager, seq: Sequence) -> int:
    """Allocate seq's whole prompt as one chunk; returns the cached-prefix token count."""
    prefix = bm.find_cached_prefix(seq)
    assert bm.can_allocate(prefix, seq.num_tokens)
    bm.allocate(seq, prefix, seq.num_tokens)
    return len(prefix) * bm.block_size


def test_engine_bookkeeping_modules_import_no_torch():
    # Load the real files under bare package shells, so optimum_nvidia_core/__init__.py (which imports torch)
    # does not run, then check nothing pulled torch in.
    code = f"""
import sys, types
for name, path in [("optimum_nvidia_core", {str(CORE)!r}), ("optimum_nvidia_core.engine", {str(CORE / "engine")!r})]:
    pkg = types.ModuleType(name); pkg.__path__ = [path]; sys.modules[name] = pkg
import optimum_nvidia_core.engine.sequence, optimum_nvidia_core.engine.block_manager
import optimum_nvidia_core.engine.scheduler
assert "torch" not in sys.modules, "engine bookkeeping imported torch"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    seq = make_seq(range(10))  # 3 blocks
    admit(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 7
    seq.num_computed_tokens = 10
    for t in range(3):  # decode to 13 tokens: one more block when token 12 arrives
        seq.append_token(100 + t)
        assert bm.can_append(seq, 1)
        bm.append(seq, 1)
        seq.num_computed_tokens += 1
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 6
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 10


def test_shared_prefix_is_reused_and_ref_counted():
    bm = BlockManager(num_blocks=64, block_size=16)
    prefix = list(range(1000, 1200))  # 200 tokens = 12 full blocks + 8
    first = make_seq(prefix + [1, 2, 3], "a")
    assert admit(bm, first) == 0
    second = make_seq(prefix + [7, 8, 9, 10], "b")
    assert admit(bm, second) == 12 * 16
    assert second.num_computed_tokens == 192
    assert second.block_table[:12] == first.block_table[:12]
    assert second.block_table[12] != first.block_table[12]  # the partial block is private
    assert all(bm.blocks[b].ref_count == 2 for b in first.block_table[:12])
    bm.free(first)
    assert all(bm.blocks[b].ref_count == 1 for b in second.block_table[:12])
    bm.free(second)
    assert bm.num_free_blocks == 64
    assert bm.stats.prefix_cache_hits == 12


def test_hash_is_chained_over_the_parent_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, first)
    bm.free(first)
    # Same second block (5..8) behind a different first block: no hit at all.
    assert bm.find_cached_prefix(make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []
    assert len(bm.find_cached_prefix(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))) == 2


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(range(8))
    admit(bm, first)
    again = make_seq(range(8))
    assert admit(bm, again) == 4  # not 8: the last block is recomputed to get logits for token 7
    assert again.num_uncomputed_tokens == 4


def test_finished_blocks_stay_cached_until_evicted_oldest_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old = make_seq([1, 2, 3, 4, 5])  # blocks [1,2] [3,4] + partial
    admit(bm, old)
    bm.free(old)
    assert bm.num_free_blocks == 4
    newer = make_seq([9, 9, 8, 8, 7])
    admit(bm, newer)  # takes the uncached block and evicts the oldest cached one
    bm.free(newer)
    assert bm.stats.evictions >= 1
    # [9,9] and [8,8] were freed last, so they survived; the evicted block was one of old's.
    assert len(bm.find_cached_prefix(make_seq([9, 9, 8, 8, 7]))) == 2
    assert len(bm.find_cached_prefix(make_seq([1, 2, 3, 4, 5]))) < 2


def test_can_allocate_counts_revived_cached_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    first = make_seq([1, 2, 3, 4, 5])
    admit(bm, first)
    bm.free(first)
    seq = make_seq([1, 2, 3, 4, 5, 6, 7])  # hits 2 cached blocks, needs 2 more: 4 > 3
    prefix = bm.find_cached_prefix(seq)
    assert len(prefix) == 2
    assert not bm.can_allocate(prefix, seq.num_tokens)
    assert bm.can_allocate(prefix, 6)  # one new block for tokens 4..5


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    first = make_seq([1, 2, 3, 4, 5])
    admit(bm, first)
    assert admit(bm, make_seq([1, 2, 3, 4, 5])) == 0


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=16)
