"""The CPU engine's paged KV cache: block ownership, commit-after-compute caching, the events it
publishes, LRU eviction of leaves, reset, snapshot, KV bytes, and a randomized replay check."""

from __future__ import annotations

import random

import pytest
import torch

from tokenyard.common.hashing import block_hashes
from tokenyard.router.index import InvalidEvent, WorkerRank
from tokenyard.router.radix import RadixIndex
from tokenyard.worker.engines.cpu.kv_cache import BlockTable, KvGeometry, PagedKvCache
from tokenyard.worker.kv_events import KvCleared, KvEventData, KvRemoved, KvStored, StoredBlock

pytestmark = pytest.mark.unit

BS = 4
GEOMETRY = KvGeometry(num_layers=2, num_kv_heads=1, head_dim=2, block_size=BS)


class Seq:
    """A token sequence with its block hashes and block table, as the scheduler keeps them."""

    def __init__(self, tokens: list[int], cache_salt: str | None = None) -> None:
        self.tokens = tokens
        self.local, self.seq = block_hashes(tokens, BS, cache_salt=cache_salt)
        self.table = BlockTable()

    def admit(self, cache: PagedKvCache) -> int:
        """Allocate with the cached prefix (leaving the last token to compute); tokens cached."""
        prefix = cache.match_prefix(self.seq[: (len(self.tokens) - 1) // BS])
        assert cache.allocate(self.table, len(self.tokens), prefix)
        return len(prefix) * BS

    def compute(self, cache: PagedKvCache) -> None:
        cache.commit(self.table, len(self.tokens), self.seq, self.local)


def make(num_blocks: int, *, prefix_caching: bool = True) -> tuple[PagedKvCache, list[KvEventData]]:
    events: list[KvEventData] = []
    cache = PagedKvCache(num_blocks, GEOMETRY, enable_prefix_caching=prefix_caching, sink=events.append)
    return cache, events


def stored(seq: Seq, start: int, end: int) -> KvStored:
    parent = seq.seq[start - 1] if start else None
    return KvStored(parent, start, tuple(StoredBlock(seq.seq[i], seq.local[i]) for i in range(start, end)))


def test_blocks_are_cached_when_computed_not_when_allocated() -> None:
    cache, events = make(8)
    a = Seq(list(range(14)))  # 3 full blocks and a partial one
    assert a.admit(cache) == 0
    assert events == []
    assert cache.cached_hashes() == set()
    assert cache.num_active_blocks == 4
    cache.commit(a.table, 9, a.seq, a.local)  # a chunk: blocks 0 and 1 are complete
    assert events == [stored(a, 0, 2)]
    a.compute(cache)
    assert events == [stored(a, 0, 2), stored(a, 2, 3)]
    assert cache.cached_hashes() == set(a.seq)


def test_a_cached_prefix_is_shared_and_publishes_nothing() -> None:
    cache, events = make(16)
    a = Seq(list(range(14)))
    a.admit(cache)
    a.compute(cache)
    events.clear()
    b = Seq([*range(12), 99, 98, 97, 96, 95])
    assert b.admit(cache) == 12
    assert b.table.blocks[:3] == a.table.blocks[:3]
    assert b.table.num_committed == 3
    assert cache.num_active_blocks == 4 + 2  # a's four, b's two new ones
    b.compute(cache)
    assert events == [stored(b, 3, 4)]


def test_a_duplicate_block_stays_private_and_its_children_still_chain() -> None:
    cache, events = make(16)
    a, b = Seq(list(range(13))), Seq(list(range(13)))
    a.admit(cache)
    b.admit(cache)  # both admitted before either was computed: no sharing
    a.compute(cache)
    events.clear()
    b.compute(cache)
    assert events == []
    assert b.table.blocks[0] is not a.table.blocks[0]
    cache.release(a.table)
    cache.release(b.table)
    assert cache.num_inactive_blocks == 3  # b's duplicates went back to the free list
    assert cache.num_free_blocks == 16


def test_a_block_whose_prefix_is_not_cached_is_not_cached() -> None:
    cache, events = make(16)
    a = Seq(list(range(12)))
    a.admit(cache)
    cache.commit(a.table, 4, a.seq, a.local)  # the first chunk: block 0 is cached
    cache.reset()  # ... and forgotten
    events.clear()
    a.compute(cache)
    assert events == []  # blocks 1 and 2 hang under a block the cache no longer has
    c = Seq(list(range(12)))
    assert c.admit(cache) == 0
    c.compute(cache)
    assert events == [stored(c, 0, 3)]


def test_eviction_is_lru_and_leaves_first() -> None:
    cache, events = make(6)
    a = Seq(list(range(12)))  # 3 full blocks
    b = Seq(list(range(100, 112)))
    for s in (a, b):
        s.admit(cache)
        s.compute(cache)
    cache.release(a.table)
    cache.release(b.table)
    events.clear()
    c = Seq(list(range(200, 208)))  # 2 blocks: takes the free blocks? none are free
    assert cache.num_free_blocks == 6
    assert c.admit(cache) == 0
    # a was released first, so its blocks go first, its tail (the leaf) before its parents.
    assert events == [KvRemoved((a.seq[2], a.seq[1]))]
    assert cache.cached_hashes() == {a.seq[0], *b.seq}


def test_a_parent_with_cached_children_is_never_evicted() -> None:
    cache, events = make(4)
    a, b = Seq(list(range(4))), Seq(list(range(9)))
    a.admit(cache)  # 1 block
    b.admit(cache)  # 3 blocks, its first a duplicate of a's
    a.compute(cache)
    b.compute(cache)  # b's block 1 is cached under a's block 0
    cache.release(a.table)
    events.clear()
    assert cache.num_free_blocks == 1  # a's block counts as inactive ...
    d = Seq(list(range(300, 304)))
    assert not cache.allocate(d.table, 4)  # ... but its cached child pins it
    assert events == []
    assert cache.cached_hashes() == {a.seq[0], b.seq[1]}


def test_allocation_is_all_or_nothing() -> None:
    cache, events = make(4)
    a = Seq(list(range(12)))
    a.admit(cache)
    b = Seq(list(range(50, 58)))
    before = cache.num_free_blocks
    assert not cache.allocate(b.table, 8)
    assert b.table.blocks == []
    assert cache.num_free_blocks == before
    assert events == []


def test_a_refused_prefix_is_given_back() -> None:
    cache, _ = make(4)
    a = Seq(list(range(8)))
    a.admit(cache)
    a.compute(cache)
    cache.release(a.table)
    filler = Seq(list(range(500, 508)))
    assert filler.admit(cache) == 0  # takes the two free blocks
    b = Seq([*range(8), *range(60, 72)])
    prefix = cache.match_prefix(b.seq)
    assert len(prefix) == 2
    assert not cache.allocate(b.table, len(b.tokens), prefix)
    assert cache.num_inactive_blocks == 2
    assert cache.num_active_blocks == 2


def test_reset_clears_and_held_blocks_are_freed_later() -> None:
    cache, events = make(8)
    a, b = Seq(list(range(8))), Seq(list(range(20, 28)))
    for s in (a, b):
        s.admit(cache)
        s.compute(cache)
    cache.release(b.table)
    events.clear()
    cache.reset()
    assert events == [KvCleared()]
    assert cache.cached_hashes() == set()
    assert cache.num_active_blocks == 2  # a's, detached
    cache.release(a.table)
    assert cache.num_free_blocks == 8
    assert cache.num_inactive_blocks == 0


def test_without_prefix_caching_nothing_is_cached_or_published() -> None:
    cache, events = make(8, prefix_caching=False)
    a = Seq(list(range(12)))
    a.admit(cache)
    a.compute(cache)
    assert events == []
    assert cache.match_prefix(a.seq) == []
    cache.release(a.table)
    assert cache.num_free_blocks == 8


def test_slots_follow_the_block_table() -> None:
    cache, _ = make(8)
    filler = Seq(list(range(4)))
    filler.admit(cache)  # takes block 0
    a = Seq(list(range(10, 20)))
    a.admit(cache)
    ids = a.table.block_ids
    assert ids == [1, 2, 3]
    assert cache.slots(a.table, 0, 10).tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert cache.slots(a.table, 5, 9).tolist() == [9, 10, 11, 12]


def test_block_bytes_round_trip_into_another_cache() -> None:
    source, _ = make(4)
    a = Seq(list(range(9)))
    a.admit(source)
    slots = source.slots(a.table, 0, 8)
    source.k[:, slots] = torch.arange(2 * 8 * 2, dtype=torch.float32).view(2, 8, 1, 2)
    source.v[:, slots] = -source.k[:, slots]
    a.compute(source)
    data = [source.read_block(b) for b in a.table.blocks[:2]]
    assert all(len(d) == GEOMETRY.block_bytes for d in data)

    target, events = make(8)
    filler = Seq(list(range(40, 44)))
    filler.admit(target)
    table = BlockTable()
    assert target.import_blocks(table, a.seq[:2], a.local[:2], data)
    assert events == [stored(a, 0, 2)]
    got = target.slots(table, 0, 8)
    assert torch.equal(target.k[:, got], source.k[:, slots])
    assert torch.equal(target.v[:, got], source.v[:, slots])
    with pytest.raises(ValueError, match="bytes"):
        target.write_block(table.blocks[0], b"short")


def test_snapshot_rebuilds_the_cache() -> None:
    cache, _ = make(32)
    seqs = [Seq(list(range(17))), Seq([*range(8), 7, 7, 7, 7, 7]), Seq(list(range(100, 109)))]
    for s in seqs:
        s.admit(cache)
        s.compute(cache)
    index = RadixIndex()
    rank = WorkerRank(1, 0)
    for chain in cache.snapshot():
        index.store(
            rank,
            chain.parent_hash,
            [b.block_hash for b in chain.blocks],
            [b.tokens_hash for b in chain.blocks],
        )
    dumped = {h for chain in index.dump(rank) for h in chain.block_hashes}
    assert dumped == cache.cached_hashes()


def apply(index: RadixIndex, rank: WorkerRank, event: KvEventData) -> None:
    match event:
        case KvStored(parent_hash, start, blocks):
            index.store(
                rank, parent_hash, [b.block_hash for b in blocks], [b.tokens_hash for b in blocks], start
            )
        case KvRemoved(hashes):
            assert index.remove(rank, hashes) == 0, "removed a block the index does not hold"
        case KvCleared():
            index.clear(rank)


@pytest.mark.parametrize("seed", range(5))
def test_randomized_workload_events_replay_to_the_cached_set(seed: int) -> None:
    """A router's radix index fed the event stream holds exactly the cached blocks, after every
    operation, and never sees an invalid edit (unknown parent, a removed inner block)."""
    rng = random.Random(seed)
    index = RadixIndex()
    rank = WorkerRank(7, 0)

    def sink(event: KvEventData) -> None:
        try:
            apply(index, rank, event)
        except InvalidEvent as exc:  # pragma: no cover - the assertion below reports it
            raise AssertionError(f"invalid event {event}: {exc}") from exc

    cache = PagedKvCache(24, GEOMETRY, sink=sink)
    stems = [[rng.randrange(50) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    live: list[Seq] = []
    for _ in range(300):
        op = rng.random()
        if op < 0.5 or not live:
            tokens = rng.choice(stems)[: rng.randrange(1, 20)] + [
                rng.randrange(50) for _ in range(rng.randrange(8))
            ]
            if not tokens:
                continue
            s = Seq(tokens, cache_salt=rng.choice([None, "tenant"]))
            prefix = cache.match_prefix(s.seq[: (len(tokens) - 1) // BS])
            if cache.allocate(s.table, len(tokens), prefix):
                live.append(s)
                # Compute in one or two chunks.
                if rng.random() < 0.5:
                    cache.commit(s.table, rng.randrange(len(prefix) * BS, len(tokens) + 1), s.seq, s.local)
                s.compute(cache)
        elif op < 0.95:
            cache.release(live.pop(rng.randrange(len(live))).table)
        else:
            cache.reset()
        held = {h for chain in index.dump(rank) for h in chain.block_hashes}
        assert held == cache.cached_hashes()
        assert cache.num_active_blocks + cache.num_free_blocks == cache.num_blocks
    for s in live:
        cache.release(s.table)
    assert cache.num_free_blocks == cache.num_blocks
