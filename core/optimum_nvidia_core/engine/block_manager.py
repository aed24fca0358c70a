"""Paged KV-cache blocks: allocation, reference counts and prefix reuse.

A sequence's KV lives in fixed-size blocks listed in ``seq.block_table``. A FULL block is identified by a hash
chained over everything before it (hash(parent hash, its token ids)), so two sequences whose first k blocks hold the
same tokens share those k blocks: a repeated system prompt, the n completions of one request, or an agent's growing
history are computed once. Blocks of finished sequences keep their hash and stay reusable until the pool runs out;
then the least recently freed one is evicted. Imports no torch.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optimum_nvidia_core.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered in the prefix cache


@dataclass
class BlockManagerStats:
    prefix_cache_queries: int = 0  # full blocks looked up when admitting a sequence
    prefix_cache_hits: int = 0  # of those, blocks found in the cache
    evictions: int = 0  # cached blocks reused for new content


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_uncached: deque[int] = deque(range(num_blocks))  # ref 0, no content worth keeping
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest first (LRU eviction)
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self.stats = BlockManagerStats()

    # -- sizes --------------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evicted on demand)."""
        return len(self._free_uncached) + len(self._free_cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached run of seq's leading full blocks. At least the last token is left out,
        so the model still runs once and yields logits for it."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        self._hash_blocks(seq, max_blocks)
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        """Extend seq.block_hashes to chain hashes of its first num_blocks full blocks (of known tokens; memoized
        on the sequence, since its tokens never change)."""
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            tokens = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hashes[-1] if hashes else b""
            hashes.append(hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest())

    # -- allocation ---------------------------------------------------------------------------------------------
    def can_allocate(self, cached_prefix: list[int], num_tokens: int) -> bool:
        """Whether a waiting sequence can get blocks for its first num_tokens tokens, reusing cached_prefix."""
        num_new = self.blocks_for(num_tokens) - len(cached_prefix)
        num_revived = sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)  # leave the free pool
        return num_new <= self.num_free_blocks - num_revived

    def allocate(self, seq: Sequence, cached_prefix: list[int], num_tokens: int) -> None:
        """Give a waiting sequence (no blocks yet) the cached prefix plus new blocks up to num_tokens tokens, and
        mark the cached tokens computed. Call can_allocate first."""
        assert not seq.block_table, f"{seq} already holds blocks"
        self.stats.prefix_cache_queries += (seq.num_tokens - 1) // self.block_size if self.enable_prefix_caching else 0
        self.stats.prefix_cache_hits += len(cached_prefix)
        for block_id in cached_prefix:
            self._take(block_id)
        seq.block_table = list(cached_prefix)
        seq.num_registered_blocks = len(cached_prefix)
        seq.num_computed_tokens = len(cached_prefix) * self.block_size
        self.append(seq, num_tokens - seq.num_computed_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to hold num_new_tokens more tokens, which this step computes, and register the
        blocks those tokens fill in the prefix cache. (Registering before the step runs is safe: every layer writes
        the whole step's K/V before any sequence attends, so a sequence that hits such a block in the same step
        reads it filled.) A block whose last token is still in flight (a placeholder) is registered by a later
        append, once its ids are known. Call can_append first."""
        end = seq.num_computed_tokens + num_new_tokens
        table = seq.block_table
        while len(table) * self.block_size < end:
            table.append(self._pop_free())
        if self.enable_prefix_caching:
            full = min(end, len(seq.token_ids)) // self.block_size
            if full > seq.num_registered_blocks:  # once per block_size tokens: the decode fast path skips this
                self._hash_blocks(seq, full)
                for i in range(seq.num_registered_blocks, full):
                    self._register(table[i], seq.block_hashes[i])
                seq.num_registered_blocks = full

    def try_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """can_append, then append: False (and nothing changed) when the free blocks are too few."""
        end = seq.num_computed_tokens + num_new_tokens
        missing = -(-end // self.block_size) - len(seq.block_table)
        if missing <= 0 and (not self.enable_prefix_caching
                             or min(end, len(seq.token_ids)) // self.block_size <= seq.num_registered_blocks):
            return True  # the common decode step: room in its last block, no block filled
        if missing > 0 and missing > len(self._free_uncached) + len(self._free_cached):
            return False
        self.append(seq, num_new_tokens)
        return True

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks. Tail blocks are freed first so they are evicted before the shared head."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free_uncached.append(block_id)
                else:
                    self._free_cached[block_id] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the tail blocks seq does not need for its first num_tokens tokens (speculative tokens that
        were rejected). They were appended for tokens never known, so they are unshared and unregistered."""
        keep = self.blocks_for(num_tokens)
        table = seq.block_table
        while len(table) > keep:
            block_id = table.pop()
            block = self.blocks[block_id]
            assert block.ref_count == 1 and block.block_hash is None, f"block {block_id} is shared or cached"
            block.ref_count = 0
            self._free_uncached.append(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (e.g. after a failed step left registered blocks unwritten)."""
        for block in self.blocks:
            if block.block_hash is not None and block.ref_count == 0:
                del self._free_cached[block.block_id]
                self._free_uncached.append(block.block_id)
            block.block_hash = None
        self._cached.clear()

    # -- internals ----------------------------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free_cached[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        elif self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)
            block = self.blocks[block_id]
            del self._cached[block.block_hash]
            block.block_hash = None
            self.stats.evictions += 1
        else:
            raise RuntimeError("no free KV block: the scheduler must check can_allocate/can_append first")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _register(self, block_id: int, block_hash: bytes) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return  # already registered, or the same content lives in another block: keep that one
        block.block_hash = block_hash
        self._cached[block_hash] = block_id
