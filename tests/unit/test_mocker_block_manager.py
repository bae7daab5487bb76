"""The KV block manager: prefix sharing, the events it publishes, eviction order, reset, snapshot."""

from __future__ import annotations

import pytest

from tokenyard.common.hashing import block_hashes, chain_hash
from tokenyard.worker.engines.mocker.block_manager import BlockTable, KvBlockManager
from tokenyard.worker.kv_events import KvCleared, KvEventData, KvRemoved, KvStored, StoredBlock

pytestmark = pytest.mark.unit

BS = 4


class Chain:
    """A token sequence with its block hashes, as the scheduler keeps them."""

    def __init__(self, tokens: list[int], cache_salt: str | None = None) -> None:
        self.tokens = tokens
        self.local, self.seq = block_hashes(tokens, BS, cache_salt=cache_salt)
        self.table = BlockTable()

    def allocate(self, manager: KvBlockManager, num_tokens: int | None = None) -> bool:
        return manager.allocate(
            self.table, len(self.tokens) if num_tokens is None else num_tokens, self.seq, self.local
        )


def make(num_blocks: int) -> tuple[KvBlockManager, list[KvEventData]]:
    events: list[KvEventData] = []
    return KvBlockManager(num_blocks, BS, sink=events.append), events


def test_store_publishes_one_chain_with_router_hashes() -> None:
    manager, events = make(16)
    a = Chain(list(range(14)))  # 3 full blocks and a partial one
    assert a.allocate(manager)
    assert events == [
        KvStored(None, 0, tuple(StoredBlock(s, loc) for s, loc in zip(a.seq, a.local, strict=True)))
    ]
    assert manager.cached_hashes() == set(a.seq)
    assert manager.num_active_blocks == 4
    assert manager.num_free_blocks == 12


def test_repeated_prompt_shares_blocks_and_publishes_nothing() -> None:
    manager, events = make(16)
    a, b = Chain(list(range(14))), Chain(list(range(14)))
    a.allocate(manager)
    events.clear()
    assert b.allocate(manager)
    assert events == []
    assert manager.num_active_blocks == 5  # 3 shared full blocks and two private partial ones
    manager.free(a.table)
    manager.free(b.table)
    assert manager.num_active_blocks == 0
    assert manager.num_inactive_blocks == 3
    c = Chain(list(range(14)))
    assert c.allocate(manager)  # inactive hits are reactivated, still no event
    assert events == []
    assert manager.num_inactive_blocks == 0
    assert manager.num_active_blocks == 4


def test_salt_separates_caches() -> None:
    manager, events = make(16)
    Chain(list(range(8))).allocate(manager)
    Chain(list(range(8)), cache_salt="tenant-b").allocate(manager)
    assert len(events) == 2
    assert len(manager.cached_hashes()) == 4


def test_growing_sequence_stores_each_new_block_with_its_parent() -> None:
    manager, events = make(16)
    a = Chain(list(range(12)))
    assert a.allocate(manager, 6)  # one full block, one partial
    assert a.allocate(manager, 7)  # still inside the partial block: nothing new
    assert len(events) == 1
    assert a.allocate(manager, 8)  # the partial block fills up and enters the cache
    assert events[-1] == KvStored(a.seq[0], 1, (StoredBlock(a.seq[1], a.local[1]),))
    assert manager.num_active_blocks == 2
    assert a.allocate(manager, 12)
    assert events[-1] == KvStored(a.seq[1], 2, (StoredBlock(a.seq[2], a.local[2]),))
    assert chain_hash(a.seq[1], a.local[2]) == a.seq[2]


def test_filled_partial_block_that_duplicates_a_cached_one_is_given_back() -> None:
    manager, events = make(16)
    a, b = Chain(list(range(8))), Chain(list(range(8)))
    a.allocate(manager, 6)
    b.allocate(manager, 6)
    assert manager.num_active_blocks == 3
    a.allocate(manager, 8)
    events.clear()
    b.allocate(manager, 8)  # b's block 1 is already cached by a
    assert events == []
    assert manager.num_active_blocks == 2


def test_eviction_takes_leaves_before_parents() -> None:
    manager, events = make(4)
    a = Chain(list(range(12)))
    a.allocate(manager)
    manager.free(a.table)
    events.clear()
    b = Chain(list(range(100, 112)))
    assert b.allocate(manager)
    assert events[0] == KvRemoved((a.seq[2], a.seq[1]))
    assert manager.cached_hashes() == {a.seq[0], *b.seq}


def test_eviction_is_lru_among_leaves() -> None:
    manager, events = make(4)
    a, b = Chain(list(range(8))), Chain(list(range(100, 108)))
    a.allocate(manager)
    b.allocate(manager)
    manager.free(a.table)
    manager.free(b.table)
    events.clear()
    c = Chain(list(range(200, 204)))
    assert c.allocate(manager)
    assert events[0] == KvRemoved((a.seq[1],))  # a was released first


def test_shared_prefix_outlives_its_branches() -> None:
    manager, events = make(5)
    prefix = list(range(4))
    x, y = Chain([*prefix, 10, 11, 12, 13]), Chain([*prefix, 20, 21, 22, 23])
    x.allocate(manager)
    y.allocate(manager)
    assert events[1] == KvStored(x.seq[0], 1, (StoredBlock(y.seq[1], y.local[1]),))
    manager.free(x.table)
    manager.free(y.table)
    events.clear()
    z = Chain(list(range(300, 312)))  # needs 3 blocks: 2 free, then both leaves before the prefix
    assert z.allocate(manager)
    assert events[0] == KvRemoved((x.seq[1],))
    w = Chain(list(range(400, 404)))
    assert w.allocate(manager)
    assert events[-2] == KvRemoved((y.seq[1],))
    assert x.seq[0] in manager.cached_hashes()


def test_failed_allocation_changes_nothing() -> None:
    manager, events = make(4)
    a = Chain(list(range(12)))
    a.allocate(manager)
    b = Chain(list(range(100, 108)))
    before = (manager.num_active_blocks, manager.num_inactive_blocks, manager.cached_hashes())
    assert not b.allocate(manager)
    assert (manager.num_active_blocks, manager.num_inactive_blocks, manager.cached_hashes()) == before
    assert b.table.num_blocks == 0
    assert len(events) == 1


def test_reactivated_blocks_count_against_capacity() -> None:
    manager, _ = make(4)
    a = Chain(list(range(12)))
    a.allocate(manager)
    manager.free(a.table)  # 3 inactive, 1 free
    b = Chain([*range(12), 50, 51, 52, 53, 54])  # reuses a's 3 blocks, needs 2 more: only 1 exists
    assert not b.allocate(manager)
    assert manager.num_inactive_blocks == 3


def test_reset_clears_and_detaches_held_blocks() -> None:
    manager, events = make(8)
    a, b = Chain(list(range(12))), Chain(list(range(100, 108)))
    a.allocate(manager, 6)
    b.allocate(manager)
    manager.free(b.table)
    events.clear()
    manager.reset()
    assert events == [KvCleared()]
    assert manager.cached_hashes() == set()
    assert manager.num_active_blocks == 2  # a still holds its blocks, privately now
    assert manager.num_inactive_blocks == 0
    a.allocate(manager, 12)  # a's prefix is no longer cached, so neither are its new blocks
    assert events == [KvCleared()]
    assert manager.cached_hashes() == set()
    manager.free(a.table)
    assert manager.num_free_blocks == 8
    c = Chain(list(range(12)))
    c.allocate(manager)  # the same tokens are stored again from the root
    assert events[-1] == KvStored(
        None, 0, tuple(StoredBlock(s, loc) for s, loc in zip(c.seq, c.local, strict=True))
    )


def test_snapshot_rebuilds_the_cache_parents_first() -> None:
    manager, _ = make(32)
    prefix = list(range(8))
    chains = [Chain([*prefix, *range(100 * i, 100 * i + 8)]) for i in range(1, 4)]
    for chain in chains:
        chain.allocate(manager)
    manager.free(chains[0].table)
    known: set[int] = set()
    for event in manager.snapshot():
        assert event.parent_hash is None or event.parent_hash in known
        known.update(b.block_hash for b in event.blocks)
    assert known == manager.cached_hashes()
    assert len(manager.snapshot()) == 3  # the first chain, then one branch run per other chain


def test_prefix_hits_and_disabled_caching() -> None:
    manager, events = make(16)
    a = Chain(list(range(12)))
    a.allocate(manager)
    assert manager.prefix_hit_blocks(Chain([*range(8), 9, 9, 9, 9]).seq) == 2
    off = KvBlockManager(16, BS, enable_prefix_caching=False, sink=events.append)
    events.clear()
    b, c = Chain(list(range(12))), Chain(list(range(12)))
    b.allocate(off)
    c.allocate(off)
    assert events == []
    assert off.num_active_blocks == 6
    assert off.prefix_hit_blocks(b.seq) == 0
    off.free(b.table)
    off.free(c.table)
    assert off.num_free_blocks == 16
