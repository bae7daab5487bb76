"""Replica sync, inbound: subscribe to every other router's lifecycle events and apply them.

Peers come from discovery (service ``router``). Each peer gets its own task that reconnects with
a backoff; a jump in a peer's ``sequence`` means events were lost (they expire in time). When a
peer leaves discovery, the requests it reported are dropped at once: their frees will never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import grpc

from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.common.discovery import Discovery, DiscoveryError, Instance, WatchEventKind
from tokenyard.common.tls import PLAINTEXT, Tls
from tokenyard.router.active import ActiveRequests
from tokenyard.router.metrics import RouterMetrics
from tokenyard.router.replication.replicas import (
    FirstToken,
    Freed,
    LifecycleEvent,
    Routed,
    apply_peer_event,
    kind,
)
from tokenyard.router.servicer import POOL_NAMES

log = logging.getLogger(__name__)


def replica_event_from_pb(msg: router_pb2.SubscribeReplicaEventsResponse) -> LifecycleEvent | None:
    which = msg.WhichOneof("event")
    if which == "routed":
        r = msg.routed
        return Routed(
            request_id=r.request_id,
            worker_id=r.worker_id,
            dp_rank=r.dp_rank,
            sequence_hashes=tuple(r.sequence_hashes),
            isl_tokens=r.isl_tokens,
            cached_tokens=r.cached_tokens,
            expected_output_tokens=r.expected_output_tokens if r.HasField("expected_output_tokens") else None,
            pool=POOL_NAMES.get(r.pool, ""),
            session_id=r.session_id,
        )
    if which == "first_token":
        return FirstToken(msg.first_token.request_id)
    if which == "freed":
        return Freed(msg.freed.request_id)
    return None


class PeerSync:
    def __init__(
        self,
        discovery: Discovery,
        router_id: str,
        active: ActiveRequests,
        metrics: RouterMetrics | None,
        tls: Tls = PLAINTEXT,
        on_routed: Callable[[Routed], None] | None = None,
    ) -> None:
        """``on_routed``: what else a peer's decision teaches this router (the scheduler's
        forecast of what each worker keeps, and session bindings)."""
        self._tls = tls
        self._on_routed = on_routed
        self._discovery = discovery
        self._router_id = router_id
        self._active = active
        self._metrics = metrics
        self._peers: dict[int, asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watch = asyncio.create_task(self._watch_routers(), name="replica-peers")

    async def close(self) -> None:
        tasks = [t for t in (self._watch, *self._peers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._peers.clear()

    @property
    def peers(self) -> list[int]:
        return list(self._peers)

    async def _watch_routers(self) -> None:
        while True:
            try:
                async for event in self._discovery.watch("router"):
                    self._on_change(event.kind, event.instance)
            except DiscoveryError as exc:
                log.warning("router watch failed, retrying in 1s: %s", exc)
                await asyncio.sleep(1.0)

    def _on_change(self, change: WatchEventKind, instance: Instance) -> None:
        peer_id = instance.instance_id
        if str(peer_id) == self._router_id:
            return
        if change is WatchEventKind.REMOVED:
            task = self._peers.pop(peer_id, None)
            if task is not None:
                task.cancel()
            dropped = self._active.drop_origin(str(peer_id))
            log.info("router %d left; dropped %d requests it had routed", peer_id, dropped)
            return
        if peer_id not in self._peers:
            self._peers[peer_id] = asyncio.create_task(self._follow(instance), name=f"replica-{peer_id}")

    async def _follow(self, peer: Instance) -> None:
        failures = 0
        while True:
            try:
                await self._session(peer)
            except grpc.aio.AioRpcError as exc:
                log.info("replica stream from router %d failed: %s", peer.instance_id, exc.code().name)
            failures += 1
            await asyncio.sleep(min(5.0, 0.05 * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0))

    async def _session(self, peer: Instance) -> None:
        async with self._tls.channel(peer.address, "router") as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            call = stub.SubscribeReplicaEvents(
                router_pb2.SubscribeReplicaEventsRequest(router_id=self._router_id)
            )
            expected: int | None = None
            try:
                async for msg in call:
                    if expected is not None and msg.sequence != expected:
                        self._count("lost", "any", max(0, msg.sequence - expected))
                    expected = msg.sequence + 1
                    event = replica_event_from_pb(msg)
                    if event is None:
                        continue
                    # Requests are attributed to the peer's registration, so they go when it leaves.
                    apply_peer_event(self._active, str(peer.instance_id), event)
                    if isinstance(event, Routed) and self._on_routed is not None:
                        self._on_routed(event)
                    self._count("received", kind(event))
            finally:
                call.cancel()

    def _count(self, direction: str, event_kind: str, n: int = 1) -> None:
        if self._metrics is not None and n:
            self._metrics.replica_events.labels(direction, event_kind).inc(n)
