"""Applying one worker's KV stream: order, gaps, snapshots, and hostile input that must not corrupt."""

from __future__ import annotations

import collections
import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenyard.common.hashing import sequence_hashes
from tokenyard.router.index import InvalidEvent, Prompt, WorkerRank, make_index
from tokenyard.router.index.radix import RadixIndex
from tokenyard.router.index.tiers import Tier, TieredIndex
from tokenyard.router.kv_ingest.stream import (
    Cleared,
    KvEvent,
    Removed,
    SnapshotPart,
    Stored,
    StreamLimits,
    StreamViolation,
    WorkerKvTracker,
)

pytestmark = pytest.mark.unit

W = 7


def stored(locals_: list[int], parent: list[int] | None = None) -> Stored:
    prefix = parent or []
    seq = sequence_hashes(prefix + locals_)
    return Stored(seq[len(prefix) - 1] if prefix else None, len(prefix), seq[len(prefix) :], locals_)


class Harness:
    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.index = TieredIndex(lambda: make_index("positional", jump=2))
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.tracker = WorkerKvTracker(W, self.index, limits, count=lambda t, s: self.counts.update([(t, s)]))

    def snapshot(self, rank: int, next_id: int, chains: list[tuple[Tier | None, Stored]]) -> None:
        got = self.tracker.add_snapshot_part(SnapshotPart(rank, next_id, chains, has_more=False))
        assert got is not None
        self.tracker.begin_snapshot(rank)
        for tier, s in got:
            self.tracker.apply_snapshot_chain(rank, tier, s)
        self.tracker.end_snapshot(rank, next_id)

    def overlap(self, locals_: list[int], rank: int = 0, tier: Tier = Tier.DEVICE) -> int:
        return self.index.tier(tier).find_matches(Prompt(locals_)).get(WorkerRank(W, rank), 0)


def ev(
    event_id: int, data: Stored | Removed | Cleared | None, rank: int = 0, tier: Tier | None = Tier.DEVICE
) -> KvEvent:
    return KvEvent(event_id, rank, tier, data)


def test_events_before_a_snapshot_are_not_applied() -> None:
    h = Harness()
    assert h.tracker.apply_batch([ev(0, stored([1, 2]))]) == {0}
    assert h.overlap([1, 2]) == 0 and h.counts[("stored", "unsynced")] == 1


def test_snapshot_then_events_in_order() -> None:
    h = Harness()
    h.snapshot(0, 5, [(Tier.DEVICE, stored([1, 2])), (Tier.HOST_PINNED, stored([9]))])
    assert h.tracker.resume_from() == {0: 5}
    assert (
        h.tracker.apply_batch(
            [
                ev(5, stored([3], parent=[1, 2])),
                ev(6, Removed([sequence_hashes([9])[0]]), tier=Tier.HOST_PINNED),
            ]
        )
        == set()
    )
    assert h.overlap([1, 2, 3]) == 3 and h.overlap([9], tier=Tier.HOST_PINNED) == 0
    assert h.tracker.resume_from() == {0: 7}
    assert h.counts[("snapshot", "ok")] == 1 and h.counts[("stored", "ok")] == 1


def test_duplicates_are_ignored_and_a_gap_asks_for_a_snapshot() -> None:
    h = Harness()
    h.snapshot(0, 0, [])
    h.snapshot(1, 0, [])
    assert h.tracker.apply_batch([ev(0, stored([1])), ev(0, Cleared()), ev(0, stored([2]), rank=1)]) == set()
    assert h.overlap([1]) == 1 and h.counts[("cleared", "duplicate")] == 1
    # Rank 0 loses event 1: it is out of sync (resubscribe without its resume id), rank 1 is not.
    assert h.tracker.apply_batch([ev(2, Cleared()), ev(1, stored([3]), rank=1)]) == {0}
    assert h.tracker.resume_from() == {1: 2}
    assert h.overlap([1]) == 1, "the stale entries stay until the snapshot replaces them"
    h.snapshot(0, 9, [(Tier.DEVICE, stored([4]))])
    assert h.overlap([1]) == 0 and h.overlap([4]) == 1
    assert h.tracker.resume_from() == {0: 9, 1: 2}


def test_snapshot_replaces_every_tier_of_the_rank_only() -> None:
    h = Harness()
    h.snapshot(0, 0, [(Tier.DEVICE, stored([1])), (Tier.DISK, stored([2]))])
    h.snapshot(1, 0, [(Tier.DEVICE, stored([1]))])
    h.snapshot(0, 3, [(Tier.DEVICE, stored([5]))])
    assert h.overlap([1]) == 0 and h.overlap([2], tier=Tier.DISK) == 0 and h.overlap([5]) == 1
    assert h.overlap([1], rank=1) == 1


def test_snapshot_in_parts() -> None:
    h = Harness()
    t = h.tracker
    assert t.add_snapshot_part(SnapshotPart(0, 4, [(Tier.DEVICE, stored([1]))], has_more=True)) is None
    chains = t.add_snapshot_part(SnapshotPart(0, 4, [(Tier.DEVICE, stored([2], parent=[1]))], has_more=False))
    assert chains is not None and len(chains) == 2
    with pytest.raises(StreamViolation):
        t.add_snapshot_part(SnapshotPart(1, 4, [], has_more=True))
        t.add_snapshot_part(SnapshotPart(1, 5, [], has_more=False))


def test_rejected_events_keep_the_rank_in_sync() -> None:
    h = Harness(StreamLimits(max_event_blocks=4, max_rank_blocks=6))
    h.snapshot(0, 0, [])
    batch = [
        ev(0, stored([1, 2])),
        ev(1, Stored(12345, None, [77], [3])),  # unknown parent
        ev(2, stored(list(range(10, 16)))),  # too many blocks in one event
        ev(3, stored([20, 21, 22])),
        ev(4, stored([30, 31, 32])),  # would exceed the rank's capacity
        ev(5, stored([40]), tier=None),  # a tier this router does not know
        ev(6, None),  # no payload
        ev(7, Removed([999])),  # unknown block
    ]
    assert h.tracker.apply_batch(batch) == set()
    assert h.tracker.resume_from() == {0: 8}
    assert h.index.device.num_blocks() == 5
    for status in ("unknown_parent", "too_large", "over_capacity"):
        assert h.counts[("stored", status)] == 1
    assert h.counts[("stored", "invalid")] == 1 and h.counts[("unknown", "invalid")] == 1
    assert h.counts[("removed", "unknown_block")] == 1


def test_huge_batch_is_a_violation() -> None:
    h = Harness(StreamLimits(max_batch_events=3))
    h.snapshot(0, 0, [])
    with pytest.raises(StreamViolation):
        h.tracker.apply_batch([ev(i, Cleared()) for i in range(4)])
    assert h.tracker.resume_from() == {}
    assert h.counts[("batch", "too_large")] == 1


def test_huge_snapshot_is_a_violation() -> None:
    h = Harness(StreamLimits(max_rank_blocks=2))
    with pytest.raises(StreamViolation):
        h.tracker.add_snapshot_part(
            SnapshotPart(0, 0, [(Tier.DEVICE, stored(list(range(20))))], has_more=False)
        )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_hostile_stream_never_corrupts_the_index(seed: int) -> None:
    """Whatever a worker sends, the index holds exactly what its accepted events say."""
    rng = random.Random(seed)
    h = Harness(StreamLimits(max_event_blocks=8, max_rank_blocks=40))
    oracle = RadixIndex()
    rank = WorkerRank(W, 0)
    h.snapshot(0, 0, [])
    next_id = 0
    paths: list[list[int]] = []
    for _ in range(120):
        roll = rng.random()
        eid = next_id
        if roll < 0.05:
            eid = max(0, next_id - rng.randint(1, 3))  # duplicate
        data: Stored | Removed | Cleared | None
        if rng.random() < 0.6:
            parent = rng.choice(paths) if paths and rng.random() < 0.6 else []
            tail = [rng.randrange(6) for _ in range(rng.randint(1, 10))]
            data = stored(tail, parent)
            if rng.random() < 0.1:
                data = Stored(rng.getrandbits(64), None, data.block_hashes, data.tokens_hashes)
            paths.append(parent + tail)
        elif rng.random() < 0.8:
            data = Removed([sequence_hashes(rng.choice(paths))[-1]] if paths else [1])
        elif rng.random() < 0.5:
            data = Cleared()
        else:
            data = None
        accepted = eid == next_id
        resync = h.tracker.apply_batch([ev(eid, data)])
        assert resync == set()
        if accepted:
            next_id += 1
            if isinstance(data, Stored) and len(data.block_hashes) <= 8:
                if oracle.num_blocks(rank) + len(data.block_hashes) <= 40:
                    with contextlib.suppress(InvalidEvent):
                        oracle.store(
                            rank, data.parent_hash, data.block_hashes, data.tokens_hashes, data.start_position
                        )
            elif isinstance(data, Removed):
                oracle.remove(rank, data.block_hashes)
            elif isinstance(data, Cleared):
                oracle.clear(rank)
        for p in rng.sample(paths, min(3, len(paths))):
            assert h.index.device.find_matches(Prompt(p)) == oracle.find_matches(Prompt(p))
    assert h.index.device.num_blocks() == oracle.num_blocks()
