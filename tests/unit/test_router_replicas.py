"""Replica sync in the domain: numbering, dropping on overflow, closing, applying peer events."""

from __future__ import annotations

import asyncio

import pytest

from tokenyard.router.active import ActiveRequest, ActiveRequests
from tokenyard.router.replication.replicas import (
    FirstToken,
    Freed,
    LifecycleEvent,
    ReplicaHub,
    Routed,
    apply_peer_event,
)

pytestmark = pytest.mark.unit


def routed(rid: str, worker: int = 1) -> Routed:
    return Routed(rid, worker, 0, (11, 12, 13), isl_tokens=48, cached_tokens=16)


async def test_events_are_numbered_and_a_full_queue_drops_the_newest() -> None:
    hub = ReplicaHub("r1", queue_size=2)
    dropped: list[LifecycleEvent] = []
    hub.on_drop = dropped.append
    hub.publish(routed("before"))  # nobody listening yet: counted, not queued
    queue = hub.subscribe()
    for rid in ("a", "b", "c"):
        hub.publish(Freed(rid))
    first, second = queue.get_nowait(), queue.get_nowait()
    assert first is not None and second is not None
    assert (first.sequence, second.sequence) == (1, 2) and first.router_id == "r1"
    assert queue.empty() and dropped == [Freed("c")]
    hub.publish(Freed("d"))
    third = queue.get_nowait()
    assert third is not None and third.sequence == 4, "the subscriber sees the gap left by the drop"


async def test_close_ends_every_stream_even_a_full_one() -> None:
    hub = ReplicaHub("r1", queue_size=1)
    full = hub.subscribe()
    hub.publish(Freed("x"))
    idle = hub.subscribe()
    hub.close()
    assert full.get_nowait() is not None and full.get_nowait() is None
    assert idle.get_nowait() is None
    late = hub.subscribe()
    assert await asyncio.wait_for(late.get(), 1) is None
    assert hub.subscribers == 0


def test_peer_events_apply_once_and_follow_migrations() -> None:
    active = ActiveRequests()
    assert apply_peer_event(active, "peer", routed("q"))
    assert not apply_peer_event(active, "peer", routed("q")), "a duplicate changes nothing"
    load = active.load(1)
    assert (load.active_requests, load.active_prefill_tokens, load.active_blocks) == (1, 32, 3)
    # The peer re-routed it (migration): the new worker takes over.
    assert apply_peer_event(active, "peer", routed("q", worker=2))
    assert active.load(1).active_requests == 0 and active.load(2).active_requests == 1
    assert apply_peer_event(active, "peer", FirstToken("q"))
    assert not apply_peer_event(active, "peer", FirstToken("q"))
    assert active.load(2).active_prefill_tokens == 0
    assert apply_peer_event(active, "peer", Freed("q")) and len(active) == 0


def test_a_departed_peer_takes_its_requests_along() -> None:
    active = ActiveRequests()
    apply_peer_event(active, "gone", routed("p1"))
    apply_peer_event(active, "gone", routed("p2"))
    active.add(ActiveRequest("mine", 1, 0, 10, 0, block_hashes=(11,)))
    assert active.drop_origin("gone") == 2
    assert [r.request_id for r in active] == ["mine"]
    assert active.load(1).active_blocks == 1
