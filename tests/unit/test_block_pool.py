"""The shared KV block pool: commit-after-compute caching, prefix sharing, the events it publishes
(with the router's hashes), LRU leaves-first eviction, all-or-nothing allocation, reset, snapshot,
imported blocks, and a randomized workload whose events replay into a router's radix index."""

from __future__ import annotations

import random

import pytest

from tokenyard.common.hashing import block_hashes, chain_hash
from tokenyard.router.index import InvalidEvent, WorkerRank
from tokenyard.router.index.radix import RadixIndex
from tokenyard.worker.engines.core.block_pool import Block, BlockPool, BlockTable
from tokenyard.worker.kv_events import KvCleared, KvEventData, KvRemoved, KvStored, StoredBlock

pytestmark = pytest.mark.unit

BS = 4


class Seq:
    """A token sequence with its block hashes and block table, as the scheduler keeps them."""

    def __init__(self, tokens: list[int], cache_salt: str | None = None) -> None:
        self.tokens = tokens
        self.local, self.seq = block_hashes(tokens, BS, cache_salt=cache_salt)
        self.table = BlockTable()

    def admit(self, pool: BlockPool, num_tokens: int | None = None) -> int:
        """Allocate the first ``num_tokens`` (all) tokens starting from the cached prefix, leaving
        at least the last token to compute, like the scheduler; the tokens the cache covers."""
        n = len(self.tokens) if num_tokens is None else num_tokens
        prefix = pool.match_prefix(self.seq[: (n - 1) // BS])
        assert pool.allocate(self.table, n, prefix)
        return len(prefix) * BS

    def compute(self, pool: BlockPool, upto: int | None = None) -> None:
        """The forward pass has written the first ``upto`` (all) tokens."""
        pool.commit(self.table, len(self.tokens) if upto is None else upto, self.seq, self.local)

    def grow(self, pool: BlockPool, upto: int) -> None:
        """Extend a running sequence to ``upto`` tokens and compute them (a decode or a chunk)."""
        assert pool.allocate(self.table, upto)
        self.compute(pool, upto)


def make(num_blocks: int, *, prefix_caching: bool = True) -> tuple[BlockPool, list[KvEventData]]:
    events: list[KvEventData] = []
    return BlockPool(num_blocks, BS, enable_prefix_caching=prefix_caching, sink=events.append), events


def stored(seq: Seq, start: int, end: int) -> KvStored:
    parent = seq.seq[start - 1] if start else None
    return KvStored(parent, start, tuple(StoredBlock(seq.seq[i], seq.local[i]) for i in range(start, end)))


# -- caching and sharing ---------------------------------------------------------------------


def test_a_computed_prompt_publishes_one_chain_with_router_hashes() -> None:
    pool, events = make(16)
    a = Seq(list(range(14)))  # 3 full blocks and a partial one
    assert a.admit(pool) == 0
    a.compute(pool)
    assert events == [
        KvStored(None, 0, tuple(StoredBlock(s, loc) for s, loc in zip(a.seq, a.local, strict=True)))
    ]
    # The sequence hash chains the local (content) hashes, exactly as a router hashes a prompt.
    assert a.seq[0] == a.local[0]
    assert all(chain_hash(a.seq[i - 1], a.local[i]) == a.seq[i] for i in range(1, 3))
    assert pool.cached_hashes() == set(a.seq)
    assert pool.num_active_blocks == 4
    assert pool.num_free_blocks == 12


def test_blocks_are_cached_when_computed_not_when_allocated() -> None:
    pool, events = make(8)
    a = Seq(list(range(14)))  # 3 full blocks and a partial one
    assert a.admit(pool) == 0
    assert events == []
    assert pool.cached_hashes() == set()
    assert pool.match_prefix(a.seq) == []
    assert pool.num_active_blocks == 4
    a.compute(pool, 9)  # a chunk: blocks 0 and 1 are complete
    assert events == [stored(a, 0, 2)]
    a.compute(pool)
    assert events == [stored(a, 0, 2), stored(a, 2, 3)]
    assert pool.cached_hashes() == set(a.seq)


def test_a_repeated_prompt_shares_blocks_and_reactivates_inactive_ones() -> None:
    pool, events = make(16)
    a, b = Seq(list(range(14))), Seq(list(range(14)))
    a.admit(pool)
    a.compute(pool)
    events.clear()
    assert b.admit(pool) == 12
    b.compute(pool)
    assert events == []
    assert b.table.blocks[:3] == a.table.blocks[:3]
    assert pool.num_active_blocks == 5  # 3 shared full blocks and two private partial ones
    pool.release(a.table)
    pool.release(b.table)
    assert pool.num_active_blocks == 0
    assert pool.num_inactive_blocks == 3
    assert pool.num_free_blocks == 16  # inactive blocks count: an allocation may evict them
    c = Seq(list(range(14)))
    assert c.admit(pool) == 12  # inactive hits are reactivated, still no event
    c.compute(pool)
    assert events == []
    assert pool.num_inactive_blocks == 0
    assert pool.num_active_blocks == 4


def test_a_cached_prefix_is_shared_and_only_new_blocks_are_published() -> None:
    pool, events = make(16)
    a = Seq(list(range(14)))
    a.admit(pool)
    a.compute(pool)
    events.clear()
    b = Seq([*range(12), 99, 98, 97, 96, 95])
    assert b.admit(pool) == 12
    assert b.table.blocks[:3] == a.table.blocks[:3]
    assert b.table.num_committed == 3
    assert pool.num_active_blocks == 4 + 2  # a's four, b's two new ones
    b.compute(pool)
    assert events == [stored(b, 3, 4)]


def test_salt_separates_caches() -> None:
    pool, events = make(16)
    plain, salted = Seq(list(range(8))), Seq(list(range(8)), cache_salt="tenant-b")
    for s in (plain, salted):
        assert s.admit(pool) == 0  # the salted prompt shares nothing with the plain one
        s.compute(pool)
    assert len(events) == 2
    assert len(pool.cached_hashes()) == 4
    assert pool.match_prefix(salted.seq) == [salted.table.blocks[0], salted.table.blocks[1]]


def test_a_growing_sequence_stores_each_new_block_under_its_parent() -> None:
    pool, events = make(16)
    a = Seq(list(range(12)))
    a.admit(pool, 6)  # one full block, one partial
    a.compute(pool, 6)
    a.grow(pool, 7)  # still inside the partial block: nothing new
    assert events == [stored(a, 0, 1)]
    a.grow(pool, 8)  # the partial block fills up and enters the cache
    assert events[-1] == KvStored(a.seq[0], 1, (StoredBlock(a.seq[1], a.local[1]),))
    assert pool.num_active_blocks == 2
    a.grow(pool, 12)
    assert events[-1] == KvStored(a.seq[1], 2, (StoredBlock(a.seq[2], a.local[2]),))
    assert chain_hash(a.seq[1], a.local[2]) == a.seq[2]
    assert len(events) == 3


def test_duplicate_blocks_stay_private() -> None:
    pool, events = make(16)
    a, b = Seq(list(range(13))), Seq(list(range(13)))
    a.admit(pool)
    b.admit(pool)  # both admitted before either was computed: no sharing
    a.compute(pool)
    events.clear()
    b.compute(pool)
    assert events == []
    assert b.table.blocks[0] is not a.table.blocks[0]
    assert pool.num_active_blocks == 8
    pool.release(a.table)
    pool.release(b.table)
    assert pool.num_inactive_blocks == 3  # b's duplicates went back to the free list
    assert pool.num_free_blocks == 16


def test_a_duplicate_blocks_children_still_chain_under_the_cached_original() -> None:
    pool, events = make(16)
    a, b = Seq(list(range(12))), Seq([*range(8), 50, 51, 52, 53])
    a.admit(pool, 6)
    a.compute(pool, 6)
    assert b.admit(pool, 6) == 4  # shares a's block 0
    assert pool.num_active_blocks == 3
    a.grow(pool, 8)
    events.clear()
    b.grow(pool, 8)  # b's block 1 is already cached by a
    assert events == []
    # Changed: the old mocker swapped a filled duplicate for the cached copy (2 active blocks);
    # the pool keeps the block the sequence computed (its KV is written there) private.
    assert pool.num_active_blocks == 3
    assert b.table.blocks[1] is not a.table.blocks[1]
    a.grow(pool, 12)
    b.grow(pool, 12)  # b's block 2 differs from a's and hangs under the cached block 1 (a's)
    assert events == [stored(a, 2, 3), KvStored(a.seq[1], 2, (StoredBlock(b.seq[2], b.local[2]),))]
    assert b.seq[1] == a.seq[1]
    pool.release(a.table)
    pool.release(b.table)
    assert pool.num_active_blocks == 0
    assert pool.num_inactive_blocks == 4  # a's three and b's block 2; b's duplicate is free
    assert pool.cached_hashes() == {*a.seq, b.seq[2]}


def test_a_block_whose_prefix_is_not_cached_is_not_cached() -> None:
    pool, events = make(16)
    a = Seq(list(range(12)))
    a.admit(pool)
    a.compute(pool, 4)  # the first chunk: block 0 is cached
    pool.reset()  # ... and forgotten
    events.clear()
    a.compute(pool)
    assert events == []  # blocks 1 and 2 hang under a block the cache no longer has
    c = Seq(list(range(12)))
    assert c.admit(pool) == 0
    c.compute(pool)
    assert events == [stored(c, 0, 3)]


def test_commit_needs_the_hashes_of_the_completed_blocks() -> None:
    pool, _ = make(8)
    a = Seq(list(range(12)))
    a.admit(pool)
    with pytest.raises(ValueError, match="hashes cover"):
        pool.commit(a.table, 12, a.seq[:2], a.local[:2])


# -- eviction --------------------------------------------------------------------------------


def test_eviction_is_lru_and_leaves_first() -> None:
    pool, events = make(6)
    a = Seq(list(range(12)))  # 3 full blocks
    b = Seq(list(range(100, 112)))
    for s in (a, b):
        s.admit(pool)
        s.compute(pool)
    pool.release(a.table)
    pool.release(b.table)
    events.clear()
    c = Seq(list(range(200, 208)))  # 2 blocks, none free: two inactive ones are evicted
    assert pool.num_free_blocks == 6
    assert c.admit(pool) == 0
    # a was released first, so its blocks go first, its tail (the leaf) before its parents.
    assert events == [KvRemoved((a.seq[2], a.seq[1]))]
    assert pool.cached_hashes() == {a.seq[0], *b.seq}


def test_eviction_is_lru_among_leaves_of_different_sequences() -> None:
    pool, events = make(4)
    a, b = Seq(list(range(8))), Seq(list(range(100, 108)))
    for s in (a, b):
        s.admit(pool)
        s.compute(pool)
    pool.release(a.table)
    pool.release(b.table)
    events.clear()
    c = Seq(list(range(200, 204)))
    c.admit(pool)
    assert events == [KvRemoved((a.seq[1],))]  # a was released first


def test_a_shared_prefix_outlives_its_branches() -> None:
    pool, events = make(5)
    prefix = list(range(4))
    x, y = Seq([*prefix, 10, 11, 12, 13]), Seq([*prefix, 20, 21, 22, 23])
    x.admit(pool)
    x.compute(pool)
    assert y.admit(pool) == 4
    y.compute(pool)
    assert events[1] == KvStored(x.seq[0], 1, (StoredBlock(y.seq[1], y.local[1]),))
    pool.release(x.table)
    pool.release(y.table)
    events.clear()
    z = Seq(list(range(300, 312)))  # needs 3 blocks: 2 free, then a leaf, not the older prefix
    z.admit(pool)
    z.compute(pool)
    assert events[0] == KvRemoved((x.seq[1],))
    w = Seq(list(range(400, 404)))
    w.admit(pool)
    w.compute(pool)
    assert events[-2] == KvRemoved((y.seq[1],))
    assert x.seq[0] in pool.cached_hashes()


def test_a_parent_with_cached_children_is_never_evicted() -> None:
    pool, events = make(4)
    a, b = Seq(list(range(4))), Seq(list(range(9)))
    a.admit(pool)  # 1 block
    b.admit(pool)  # 3 blocks, its first a duplicate of a's
    a.compute(pool)
    b.compute(pool)  # b's block 1 is cached under a's block 0
    pool.release(a.table)
    events.clear()
    assert pool.num_free_blocks == 1  # a's block counts as inactive ...
    d = Seq(list(range(300, 304)))
    assert not pool.allocate(d.table, 4)  # ... but its cached child pins it
    assert d.table.blocks == []
    assert events == []
    assert pool.cached_hashes() == {a.seq[0], b.seq[1]}


# -- all or nothing --------------------------------------------------------------------------


def test_allocation_is_all_or_nothing() -> None:
    pool, events = make(4)
    a = Seq(list(range(12)))
    a.admit(pool)
    a.compute(pool)
    b = Seq(list(range(50, 58)))
    before = (pool.num_free_blocks, pool.num_active_blocks, pool.num_inactive_blocks, pool.cached_hashes())
    assert not pool.allocate(b.table, 8)
    assert b.table.blocks == []
    assert (
        pool.num_free_blocks,
        pool.num_active_blocks,
        pool.num_inactive_blocks,
        pool.cached_hashes(),
    ) == before
    assert len(events) == 1  # a's stored, nothing since


def test_a_refused_prefix_is_given_back() -> None:
    pool, _ = make(4)
    a = Seq(list(range(8)))
    a.admit(pool)
    a.compute(pool)
    pool.release(a.table)
    filler = Seq(list(range(500, 508)))
    assert filler.admit(pool) == 0  # takes the two free blocks
    b = Seq([*range(8), *range(60, 72)])
    prefix = pool.match_prefix(b.seq)
    assert len(prefix) == 2
    assert not pool.allocate(b.table, len(b.tokens), prefix)
    assert b.table.blocks == []
    assert pool.num_inactive_blocks == 2
    assert pool.num_active_blocks == 2


def test_reactivated_blocks_count_against_capacity() -> None:
    pool, _ = make(4)
    a = Seq(list(range(12)))
    a.admit(pool)
    a.compute(pool)
    pool.release(a.table)  # 3 inactive, 1 free
    b = Seq([*range(12), 50, 51, 52, 53, 54])  # reuses a's 3 blocks, needs 2 more: only 1 exists
    prefix = pool.match_prefix(b.seq[: (len(b.tokens) - 1) // BS])
    assert len(prefix) == 3
    assert not pool.allocate(b.table, len(b.tokens), prefix)
    assert pool.num_inactive_blocks == 3
    assert pool.cached_hashes() == set(a.seq)


def test_a_prefix_only_starts_an_empty_table() -> None:
    pool, _ = make(8)
    a = Seq(list(range(8)))
    a.admit(pool)
    a.compute(pool)
    b = Seq(list(range(8)))
    b.admit(pool, 4)
    with pytest.raises(ValueError, match="empty block table"):
        pool.allocate(b.table, 8, pool.match_prefix(a.seq))


# -- reset and snapshot ----------------------------------------------------------------------


def test_reset_clears_and_held_blocks_are_detached_until_released() -> None:
    pool, events = make(8)
    a, b = Seq(list(range(12))), Seq(list(range(100, 108)))
    a.admit(pool, 6)
    a.compute(pool, 6)
    b.admit(pool)
    b.compute(pool)
    pool.release(b.table)
    events.clear()
    pool.reset()
    assert events == [KvCleared()]
    assert pool.cached_hashes() == set()
    assert pool.num_active_blocks == 2  # a still holds its blocks, privately now
    assert pool.num_inactive_blocks == 0
    assert pool.num_free_blocks == 6
    a.grow(pool, 12)  # a's prefix is no longer cached, so neither are its new blocks
    assert events == [KvCleared()]
    assert pool.cached_hashes() == set()
    pool.release(a.table)
    assert pool.num_free_blocks == 8
    assert pool.num_inactive_blocks == 0
    c = Seq(list(range(12)))
    assert c.admit(pool) == 0
    c.compute(pool)  # the same tokens are stored again from the root
    assert events[-1] == stored(c, 0, 3)


def test_snapshot_rebuilds_the_cache_parents_first() -> None:
    pool, _ = make(32)
    prefix = list(range(8))
    chains = [Seq([*prefix, *range(100 * i, 100 * i + 8)]) for i in range(1, 4)]
    for chain in chains:
        chain.admit(pool)
        chain.compute(pool)
    pool.release(chains[0].table)
    known: set[int] = set()
    for event in pool.snapshot():
        assert event.parent_hash is None or event.parent_hash in known
        known.update(b.block_hash for b in event.blocks)
    assert known == pool.cached_hashes()
    assert len(pool.snapshot()) == 3  # the first chain, then one branch run per other chain


def test_snapshot_replays_into_a_router_index() -> None:
    pool, _ = make(32)
    seqs = [Seq(list(range(17))), Seq([*range(8), 7, 7, 7, 7, 7]), Seq(list(range(100, 109)))]
    for s in seqs:
        s.admit(pool)
        s.compute(pool)
    index = RadixIndex()
    rank = WorkerRank(1, 0)
    for chain in pool.snapshot():
        index.store(
            rank,
            chain.parent_hash,
            [b.block_hash for b in chain.blocks],
            [b.tokens_hash for b in chain.blocks],
            chain.start_position,
        )
    dumped = {h for chain in index.dump(rank) for h in chain.block_hashes}
    assert dumped == pool.cached_hashes()


# -- prefix hits, disabled caching -----------------------------------------------------------


def test_prefix_hits_and_disabled_caching() -> None:
    pool, _ = make(16)
    a = Seq(list(range(12)))
    a.admit(pool)
    a.compute(pool)
    assert len(pool.match_prefix(Seq([*range(8), 9, 9, 9, 9]).seq)) == 2
    off, off_events = make(16, prefix_caching=False)
    b, c = Seq(list(range(12))), Seq(list(range(12)))
    for s in (b, c):
        assert s.admit(off) == 0
        s.compute(off)
    assert off_events == []
    assert off.cached_hashes() == set()
    assert off.num_active_blocks == 6
    assert off.match_prefix(b.seq) == []
    assert off.snapshot() == []
    off.release(b.table)
    off.release(c.table)
    assert off.num_free_blocks == 16
    assert off.num_inactive_blocks == 0


# -- imported blocks -------------------------------------------------------------------------


def test_imported_blocks_share_the_cached_prefix_and_fill_the_rest() -> None:
    pool, events = make(8)
    a = Seq(list(range(12)))
    a.admit(pool, 5)
    a.compute(pool, 5)  # block 0 cached
    events.clear()
    filled: list[tuple[int, int]] = []

    def fill(block: Block, i: int) -> None:
        filled.append((block.block_id, i))

    table = BlockTable()
    assert pool.import_blocks(table, a.seq, a.local, fill)
    assert table.blocks[0] is a.table.blocks[0]
    assert [i for _, i in filled] == [1, 2]  # the cached block is shared, not written
    assert [bid for bid, _ in filled] == table.block_ids[1:]
    assert table.num_committed == 3
    assert events == [stored(a, 1, 3)]
    with pytest.raises(ValueError, match="empty block table"):
        pool.import_blocks(table, a.seq, a.local, fill)
    # All or nothing: five blocks do not fit the four left.
    assert pool.num_free_blocks == 4
    big = Seq(list(range(300, 320)))
    other = BlockTable()
    before = (pool.num_free_blocks, pool.num_active_blocks)
    assert not pool.import_blocks(other, big.seq, big.local, fill)
    assert other.blocks == []
    assert (pool.num_free_blocks, pool.num_active_blocks) == before
    assert len(filled) == 2


# -- randomized ------------------------------------------------------------------------------


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

    pool = BlockPool(24, BS, sink=sink)
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
            prefix = pool.match_prefix(s.seq[: (len(tokens) - 1) // BS])
            if pool.allocate(s.table, len(tokens), prefix):
                live.append(s)
                # Compute in one or two chunks.
                if rng.random() < 0.5:
                    pool.commit(s.table, rng.randrange(len(prefix) * BS, len(tokens) + 1), s.seq, s.local)
                s.compute(pool)
            else:
                assert s.table.blocks == []
        elif op < 0.95:
            pool.release(live.pop(rng.randrange(len(live))).table)
        else:
            pool.reset()
        held = {h for chain in index.dump(rank) for h in chain.block_hashes}
        assert held == pool.cached_hashes()
        assert pool.num_active_blocks + pool.num_free_blocks == pool.num_blocks
        assert 0 <= pool.num_inactive_blocks <= pool.num_free_blocks
    for s in live:
        pool.release(s.table)
    assert pool.num_free_blocks == pool.num_blocks
    assert pool.num_active_blocks == 0
