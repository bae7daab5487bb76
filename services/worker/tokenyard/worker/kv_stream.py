"""The KV event stream a worker serves to routers: replay or snapshot first, then live events and loads.

Resume points follow the proto: ``resume_from[rank] = N`` names the first event the subscriber
still needs (its last applied id + 1). The worker keeps the newest ``buffer_size`` events of each
rank; a subscriber whose N is still buffered (or is exactly the next id to be published) gets
precisely the events N, N+1, ... and nothing else. Any other N (evicted from the buffer, or never
published, as after a worker restart) and any rank without a resume point start with a snapshot of
the rank's cache consistent with the event stream: the next event on the stream for that rank is
the snapshot's ``next_event_id``. Load snapshots of the subscribed ranks follow at once, then
every ``load_interval``.

A slow subscriber never holds the engine up: events are handed to each subscriber's bounded queue
from the engine step, without waiting. When a subscriber's queue is full, its queued events are
dropped and the subscriber is *resynced in place*: the next thing it receives is a fresh snapshot
of each of its ranks, and live events continue after it. The stream stays open (no reconnect, no
gap to detect), and the proto's rule that a snapshot replaces what the subscriber held for the
rank makes this safe to apply.

Everything here runs on the event loop; snapshots are taken synchronously, between two engine
events, which is what makes them consistent with the event ids.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

from tokenyard.common.errors import InvalidArgument, Unavailable
from tokenyard.worker.engines.base import Engine, KvSnapshot, RankLoad
from tokenyard.worker.kv_events import KvCleared, KvEvent, KvRemoved
from tokenyard.worker.metrics import WorkerMetrics


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """Consecutive events as they were published (ids increase by one within each rank)."""

    events: tuple[KvEvent, ...]


KvStreamItem = KvEventBatch | KvSnapshot | RankLoad


def _kind(event: KvEvent) -> str:
    if isinstance(event.data, KvRemoved):
        return "removed"
    if isinstance(event.data, KvCleared):
        return "cleared"
    return "stored"


class KvEventHub:
    """Keeps the recent events of every rank and fans each new one out to the subscribers."""

    def __init__(
        self,
        engine: Engine,
        *,
        buffer_size: int = 1024,
        queue_size: int = 4096,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if buffer_size < 1 or queue_size < 1:
            raise ValueError("buffer_size and queue_size must be positive")
        self._engine = engine
        self._buffer_size = buffer_size
        self._queue_size = queue_size
        self._metrics = metrics
        self._rings: dict[int, deque[KvEvent]] = {}
        self._last_ids: dict[int, int] = {}
        self._subscriptions: set[KvSubscription] = set()
        self._closed = False
        # Subscribed at construction, before the engine starts, so that the buffer holds event 0.
        self._unsubscribe = engine.subscribe_kv_events(self._on_event)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def _on_event(self, event: KvEvent) -> None:
        ring = self._rings.get(event.dp_rank)
        if ring is None:
            ring = self._rings[event.dp_rank] = deque(maxlen=self._buffer_size)
        ring.append(event)
        self._last_ids[event.dp_rank] = event.event_id
        if self._metrics is not None:
            self._metrics.kv_events.labels(str(event.dp_rank), _kind(event)).inc()
        for subscription in self._subscriptions:
            subscription.offer(event)

    def events_from(self, dp_rank: int, first_wanted: int) -> list[KvEvent] | None:
        """The rank's events from ``first_wanted`` on; None when they are not all buffered."""
        last = self._last_ids.get(dp_rank, -1)
        if first_wanted == last + 1:
            return []
        ring = self._rings.get(dp_rank)
        if not ring or not ring[0].event_id <= first_wanted <= last:
            return None
        return list(itertools.islice(ring, first_wanted - ring[0].event_id, None))

    def subscribe(self, dp_rank: int | None, resume_from: Mapping[int, int]) -> KvSubscription:
        """A new stream of one rank (or all); ``resume_from`` maps rank to the first event id wanted."""
        if self._closed:
            raise Unavailable("the worker is shutting down")
        dp_size = self._engine.info().dp_size
        if dp_rank is not None and not 0 <= dp_rank < dp_size:
            raise InvalidArgument(f"dp_rank {dp_rank} out of range: this worker has ranks 0..{dp_size - 1}")
        ranks = tuple(range(dp_size)) if dp_rank is None else (dp_rank,)
        initial: list[KvStreamItem] = []
        for rank in ranks:
            wanted = resume_from.get(rank)
            replay = None if wanted is None else self.events_from(rank, wanted)
            if replay is None:
                initial.append(self._engine.kv_snapshot(rank))
            elif replay:
                initial.append(KvEventBatch(tuple(replay)))
        initial.extend(self._loads(ranks))
        subscription = KvSubscription(self, ranks, initial, self._queue_size)
        self._subscriptions.add(subscription)
        self._count_subscribers()
        return subscription

    def publish_loads(self, loads: Sequence[RankLoad]) -> None:
        for subscription in self._subscriptions:
            subscription.offer_loads(loads)

    def close(self) -> None:
        """End every stream once it delivered what it holds; refuse new subscribers."""
        self._closed = True
        for subscription in tuple(self._subscriptions):
            subscription.close()
        self._unsubscribe()

    # -- for subscriptions ------------------------------------------------------------------

    def _resync_items(self, ranks: Sequence[int]) -> list[KvStreamItem]:
        if self._metrics is not None:
            self._metrics.kv_resyncs.inc()
        return [*(self._engine.kv_snapshot(rank) for rank in ranks), *self._loads(ranks)]

    def _loads(self, ranks: Sequence[int]) -> list[RankLoad]:
        wanted = set(ranks)
        return [load for load in self._engine.load() if load.dp_rank in wanted]

    def _remove(self, subscription: KvSubscription) -> None:
        self._subscriptions.discard(subscription)
        self._count_subscribers()

    def _count_subscribers(self) -> None:
        if self._metrics is not None:
            self._metrics.kv_subscribers.set(len(self._subscriptions))


class KvSubscription:
    """One subscriber's view: its initial items, then a bounded queue of live events and the latest loads."""

    def __init__(
        self, hub: KvEventHub, ranks: tuple[int, ...], initial: list[KvStreamItem], max_queued: int
    ) -> None:
        self.ranks = ranks
        self._hub = hub
        self._rank_set = frozenset(ranks)
        self._initial = initial
        self._max_queued = max_queued
        self._events: list[KvEvent] = []
        self._loads: dict[int, RankLoad] = {}
        self._resync = False
        self._closed = False
        self._wake = asyncio.Event()

    def offer(self, event: KvEvent) -> None:
        # While a resync is pending, new events are covered by the snapshot it will take.
        if event.dp_rank not in self._rank_set or self._closed or self._resync:
            return
        if len(self._events) >= self._max_queued:
            self._events.clear()
            self._resync = True
        else:
            self._events.append(event)
        self._wake.set()

    def offer_loads(self, loads: Sequence[RankLoad]) -> None:
        if self._closed:
            return
        for load in loads:
            if load.dp_rank in self._rank_set:
                self._loads[load.dp_rank] = load  # only the newest load of a rank matters
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def next_items(self) -> list[KvStreamItem]:
        """What to send next, in order; an empty list once the stream is over."""
        while True:
            if self._initial:
                items, self._initial = self._initial, []
                return items
            if self._resync:
                self._resync = False
                self._loads.clear()
                return self._hub._resync_items(self.ranks)
            items = []
            if self._events:
                items.append(KvEventBatch(tuple(self._events)))
                self._events = []
            if self._loads:
                items.extend(self._loads[rank] for rank in sorted(self._loads))
                self._loads.clear()
            if items:
                return items
            if self._closed:
                return []
            self._wake.clear()
            await self._wake.wait()

    async def items(self) -> AsyncGenerator[KvStreamItem, None]:
        """Every item until the hub closes; leaving the loop unsubscribes."""
        try:
            while batch := await self.next_items():
                for item in batch:
                    yield item
        finally:
            self._closed = True
            self._hub._remove(self)
