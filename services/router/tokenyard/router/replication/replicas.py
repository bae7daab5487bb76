"""Replica sync: the lifecycle events a router originates, fanned out to its peer routers.

Every router publishes what it decides and hears from frontends (routed, first token, freed),
numbered consecutively from its start; peers apply them to their own active-request tracking so
that every replica predicts the same load. A router never republishes what it received from a
peer, so events do not echo. Delivery is best effort: a subscriber whose queue is full loses
events (it sees a jump in ``sequence``), and what a peer never frees expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenyard.router.active import ActiveRequests, routed_request

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Routed:
    request_id: str
    worker_id: int
    dp_rank: int
    sequence_hashes: Sequence[int]
    isl_tokens: int
    cached_tokens: int
    expected_output_tokens: int | None = None
    # The pool it was routed in ("" the default): what its load counts as.
    pool: str = ""
    # The request's session hint ("" none): peers bind it to the same worker.
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class FirstToken:
    request_id: str


@dataclass(frozen=True, slots=True)
class Freed:
    request_id: str


LifecycleEvent = Routed | FirstToken | Freed


@dataclass(frozen=True, slots=True)
class ReplicaEvent:
    router_id: str
    sequence: int
    timestamp_unix_ns: int
    event: LifecycleEvent


def kind(event: LifecycleEvent) -> str:
    if isinstance(event, Routed):
        return "routed"
    return "first_token" if isinstance(event, FirstToken) else "freed"


class ReplicaHub:
    """Numbers this router's lifecycle events and hands them to every live subscriber."""

    def __init__(self, router_id: str, queue_size: int = 4096) -> None:
        self.router_id = router_id
        self._queue_size = queue_size
        self._sequence = 0
        # None on a queue ends that subscriber's stream (shutdown).
        self._subscribers: set[asyncio.Queue[ReplicaEvent | None]] = set()
        self._closed = False
        self.on_drop: Callable[[LifecycleEvent], None] | None = None

    def publish(self, event: LifecycleEvent) -> None:
        if not self._subscribers:
            # Numbering only matters to subscribers; a quiet router still counts so that a
            # subscriber arriving later does not mistake a restart for continuity.
            self._sequence += 1
            return
        item = ReplicaEvent(self.router_id, self._sequence, time.time_ns(), event)
        self._sequence += 1
        for queue in self._subscribers:
            if queue.qsize() >= self._queue_size:
                # Drop the newest: the subscriber detects the gap; blocking here would stall routing.
                if self.on_drop is not None:
                    self.on_drop(event)
                continue
            queue.put_nowait(item)

    def subscribe(self) -> asyncio.Queue[ReplicaEvent | None]:
        queue: asyncio.Queue[ReplicaEvent | None] = asyncio.Queue(self._queue_size + 1)
        if self._closed:
            queue.put_nowait(None)
        else:
            self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[ReplicaEvent | None]) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """End every subscriber's stream (their gRPC calls complete instead of holding shutdown)."""
        self._closed = True
        for queue in self._subscribers:
            # The extra slot each queue has keeps room for this even when it is full of events.
            queue.put_nowait(None)
        self._subscribers.clear()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


def apply_peer_event(active: ActiveRequests, origin: str, event: LifecycleEvent) -> bool:
    """Apply a peer router's event to this router's tracking; True if it changed anything."""
    if isinstance(event, Routed):
        current = active.get(event.request_id)
        if current is not None:
            if (current.worker_id, current.dp_rank) == (event.worker_id, event.dp_rank):
                return False
            # Re-routed elsewhere (a migration decided by the peer): the new assignment wins.
            active.finish(event.request_id)
        return active.add(
            routed_request(
                event.request_id,
                event.worker_id,
                event.dp_rank,
                event.isl_tokens,
                event.cached_tokens,
                tuple(event.sequence_hashes),
                event.pool,
                origin=origin,
                expected_output_tokens=event.expected_output_tokens,
            )
        )
    if isinstance(event, FirstToken):
        return active.first_token(event.request_id)
    return active.finish(event.request_id)
