"""One worker's KV event stream as the router applies it: ordering, gaps, snapshots, hostile input.

Per dp rank the tracker knows the next event id it expects, or that it has none yet and waits for
a snapshot. Event ids are consecutive per rank, so:

* ``id < next``: a duplicate, ignored;
* ``id > next``: events were lost; the rank is out of sync and the stream must be restarted
  asking for a snapshot of that rank (the others resume where they were). Until the snapshot
  arrives the rank keeps its current, slightly stale entries: routing never waits for a repair;
* a snapshot replaces the rank's entries in every tier and sets its next id.

Every event is counted by type and status. An event the index refuses (unknown parent, a hash
naming two blocks, too many blocks) is rejected whole and the rank stays in sync: the index
only misses what that event would have added. A batch or snapshot too large to take is a
protocol violation (:class:`StreamViolation`): the stream is dropped and restarted after a
backoff, so a hostile worker costs bounded work and never affects another worker's stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenyard.router.index import InvalidEvent, WorkerRank
from tokenyard.router.index.tiers import Tier, TieredIndex


@dataclass(frozen=True, slots=True)
class Stored:
    parent_hash: int | None
    start_position: int | None
    block_hashes: Sequence[int]
    tokens_hashes: Sequence[int]


@dataclass(frozen=True, slots=True)
class Removed:
    block_hashes: Sequence[int]


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


@dataclass(frozen=True, slots=True)
class KvEvent:
    event_id: int
    dp_rank: int
    # None: a tier this router does not know.
    tier: Tier | None
    data: Stored | Removed | Cleared | None


@dataclass(frozen=True, slots=True)
class SnapshotPart:
    dp_rank: int
    next_event_id: int
    chains: Sequence[tuple[Tier | None, Stored]]
    has_more: bool


@dataclass(frozen=True, slots=True)
class StreamLimits:
    max_batch_events: int = 10_000
    max_event_blocks: int = 65_536
    max_rank_blocks: int = 4_000_000
    max_dp_rank: int = 1023

    @property
    def max_snapshot_blocks(self) -> int:
        # A snapshot covers every tier of a rank.
        return self.max_rank_blocks * len(Tier)


class StreamViolation(Exception):
    """The worker broke the stream contract; ``reason`` labels metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


Count = Callable[[str, str], None]


def _ignore(event_type: str, status: str) -> None:
    pass


@dataclass(slots=True)
class _PendingSnapshot:
    next_event_id: int
    chains: list[tuple[Tier | None, Stored]] = field(default_factory=list)
    blocks: int = 0


class WorkerKvTracker:
    def __init__(
        self,
        worker_id: int,
        index: TieredIndex,
        limits: StreamLimits | None = None,
        *,
        count: Count = _ignore,
        apply_kv: bool = True,
    ) -> None:
        self.worker_id = worker_id
        self._index = index
        self._limits = limits or StreamLimits()
        self._count = count
        # Approximate mode keeps the stream (for load reports) but leaves the index alone.
        self._apply_kv = apply_kv
        self._next: dict[int, int] = {}
        self._pending: dict[int, _PendingSnapshot] = {}

    # -- state --------------------------------------------------------------------------------

    @property
    def limits(self) -> StreamLimits:
        return self._limits

    def count(self, event_type: str, status: str) -> None:
        self._count(event_type, status)

    def resume_from(self) -> dict[int, int]:
        """Per in-sync rank, the first event id still needed (what to resubscribe with)."""
        return dict(self._next)

    def next_event_id(self, dp_rank: int) -> int | None:
        return self._next.get(dp_rank)

    def desync(self, ranks: Sequence[int]) -> None:
        """Forget the position of ``ranks``: the next subscription asks for their snapshots."""
        for rank in ranks:
            self._next.pop(rank, None)
            self._pending.pop(rank, None)

    def stream_restarted(self) -> None:
        """Partial snapshots do not survive a new subscription (it starts them over)."""
        self._pending.clear()

    # -- events -------------------------------------------------------------------------------

    def apply_batch(self, events: Sequence[KvEvent]) -> set[int]:
        """Apply a batch in order; returns the ranks that fell out of sync (to resubscribe for)."""
        limits = self._limits
        if len(events) > limits.max_batch_events:
            self.reject_batch([e.dp_rank for e in events])
        resync: set[int] = set()
        for event in events:
            rank = event.dp_rank
            if rank > limits.max_dp_rank:
                self._count(_type(event), "bad_rank")
                continue
            expected = self._next.get(rank)
            if expected is None:
                # No snapshot for this rank yet (or it is being repaired): nothing to apply to.
                self._count(_type(event), "unsynced")
                resync.add(rank)
                continue
            if event.event_id < expected:
                self._count(_type(event), "duplicate")
                continue
            if event.event_id > expected:
                self._count(_type(event), "gap")
                self.desync([rank])
                resync.add(rank)
                continue
            self._next[rank] = expected + 1
            self._count(_type(event), self._apply(event))
        return resync

    def reject_batch(self, dp_ranks: Sequence[int]) -> None:
        """A batch too large to take: its ranks lose their position; raises StreamViolation."""
        limits = self._limits
        self._count("batch", "too_large")
        self.desync(sorted({r for r in dp_ranks if r <= limits.max_dp_rank}))
        raise StreamViolation(
            "too_large", f"a batch of {len(dp_ranks)} events (limit {limits.max_batch_events})"
        )

    def _apply(self, event: KvEvent) -> str:
        if event.tier is None or event.data is None:
            return "invalid"
        if not self._apply_kv:
            return "ignored"
        rank = WorkerRank(self.worker_id, event.dp_rank)
        index = self._index.tier(event.tier)
        data = event.data
        if isinstance(data, Stored):
            n = len(data.block_hashes)
            if n > self._limits.max_event_blocks:
                return "too_large"
            if index.num_blocks(rank) + n > self._limits.max_rank_blocks:
                return "over_capacity"
            try:
                index.store(
                    rank, data.parent_hash, data.block_hashes, data.tokens_hashes, data.start_position
                )
            except InvalidEvent as exc:
                return exc.reason
            return "ok"
        if isinstance(data, Removed):
            if len(data.block_hashes) > self._limits.max_event_blocks:
                return "too_large"
            return "ok" if index.remove(rank, data.block_hashes) == 0 else "unknown_block"
        self._index.clear_tier(event.tier, rank)
        return "ok"

    # -- snapshots ----------------------------------------------------------------------------

    def add_snapshot_part(self, part: SnapshotPart) -> list[tuple[Tier | None, Stored]] | None:
        """Collect a snapshot's parts; returns its chains once the last part arrived."""
        limits = self._limits
        if part.dp_rank > limits.max_dp_rank:
            self._count("snapshot", "bad_rank")
            raise StreamViolation("bad_rank", f"snapshot of rank {part.dp_rank}")
        pending = self._pending.get(part.dp_rank)
        if pending is None:
            pending = self._pending[part.dp_rank] = _PendingSnapshot(part.next_event_id)
        elif pending.next_event_id != part.next_event_id:
            self._count("snapshot", "inconsistent")
            del self._pending[part.dp_rank]
            raise StreamViolation("inconsistent", "snapshot parts disagree on next_event_id")
        pending.chains.extend(part.chains)
        pending.blocks += sum(len(stored.block_hashes) for _, stored in part.chains)
        if pending.blocks > limits.max_snapshot_blocks:
            self._count("snapshot", "too_large")
            del self._pending[part.dp_rank]
            raise StreamViolation("too_large", f"snapshot of over {limits.max_snapshot_blocks} blocks")
        if part.has_more:
            return None
        del self._pending[part.dp_rank]
        return pending.chains

    def begin_snapshot(self, dp_rank: int) -> None:
        """Drop the rank's entries in every tier (the snapshot's chains follow)."""
        self._next.pop(dp_rank, None)
        if self._apply_kv:
            self._index.clear(WorkerRank(self.worker_id, dp_rank))

    def apply_snapshot_chain(self, dp_rank: int, tier: Tier | None, stored: Stored) -> None:
        if tier is None:
            self._count("snapshot_chain", "invalid")
            return
        if not self._apply_kv:
            return
        self._count("snapshot_chain", self._apply(KvEvent(0, dp_rank, tier, stored)))

    def end_snapshot(self, dp_rank: int, next_event_id: int) -> None:
        self._next[dp_rank] = next_event_id
        self._count("snapshot", "ok")


def _type(event: KvEvent) -> str:
    data = event.data
    if isinstance(data, Stored):
        return "stored"
    if isinstance(data, Removed):
        return "removed"
    return "cleared" if isinstance(data, Cleared) else "unknown"
