"""Outbound KV streams: one task per worker subscribes to its ``SubscribeKvEvents`` and feeds the
worker's :class:`~tokenyard.router.kv_ingest.stream.WorkerKvTracker`.

This is the edge where the worker contract's messages become the router's domain events. Each
worker has its own task, channel and backoff, so a slow, broken or hostile worker never delays
another's stream, and routing (which only reads the index) never waits for any of them.

A subscription resumes every in-sync rank at its next event id and asks for a snapshot of the
others. When the tracker reports a gap, the call is dropped and reopened at once (only the
broken rank gets a snapshot). Errors and protocol violations reopen it after an exponential
backoff that resets once a stream has stayed healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import grpc

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Instance, WatchEventKind
from tokenyard.common.tls import PLAINTEXT, Tls
from tokenyard.router.index.tiers import Tier
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
from tokenyard.router.metrics import RouterMetrics
from tokenyard.router.scheduler import Scheduler
from tokenyard.router.workers import LoadReport, WorkerDetails, WorkerSet, WorkerState

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    # Snapshots of large caches come in parts, but a part can still be several MiB.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Event streams idle for long stretches; keep them alive through NATs within the servers'
    # ping policy (10 s minimum between pings).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)
# Blocks applied between yields to the event loop while a snapshot is being indexed, and events
# per slice of a large batch.
SNAPSHOT_SLICE = 4096
BATCH_SLICE = 256
DESCRIBE_TIMEOUT = 5.0
# A stream that lasted this long (seconds) and delivered something resets the backoff.
HEALTHY_AFTER = 5.0

_TIERS = {
    worker_pb2.STORAGE_TIER_UNSPECIFIED: Tier.DEVICE,
    worker_pb2.STORAGE_TIER_DEVICE: Tier.DEVICE,
    worker_pb2.STORAGE_TIER_HOST_PINNED: Tier.HOST_PINNED,
    worker_pb2.STORAGE_TIER_DISK: Tier.DISK,
    worker_pb2.STORAGE_TIER_EXTERNAL: Tier.EXTERNAL,
}


def stored_from_pb(msg: worker_pb2.KvStored) -> Stored:
    blocks = msg.blocks
    return Stored(
        parent_hash=msg.parent_hash if msg.HasField("parent_hash") else None,
        start_position=msg.start_position if msg.HasField("start_position") else None,
        block_hashes=[b.block_hash for b in blocks],
        tokens_hashes=[b.tokens_hash for b in blocks],
    )


def event_from_pb(msg: worker_pb2.KvEvent) -> KvEvent:
    which = msg.WhichOneof("data")
    data: Stored | Removed | Cleared | None
    if which == "stored":
        data = stored_from_pb(msg.stored)
    elif which == "removed":
        data = Removed(list(msg.removed.block_hashes))
    elif which == "cleared":
        data = Cleared()
    else:
        data = None
    return KvEvent(msg.event_id, msg.dp_rank, _TIERS.get(msg.tier), data)


def snapshot_from_pb(msg: worker_pb2.KvSnapshot) -> SnapshotPart:
    return SnapshotPart(
        dp_rank=msg.dp_rank,
        next_event_id=msg.next_event_id,
        chains=[(_TIERS.get(c.tier), stored_from_pb(c.stored)) for c in msg.chains],
        has_more=msg.has_more,
    )


def load_from_pb(msg: worker_pb2.LoadSnapshot) -> LoadReport:
    return LoadReport(
        dp_rank=msg.dp_rank,
        active_blocks=msg.active_blocks,
        total_blocks=msg.total_blocks,
        waiting_requests=msg.waiting_requests,
        running_requests=msg.running_requests,
        active_prefill_tokens=msg.active_prefill_tokens,
    )


class _Resync(Exception):
    """The tracker lost a rank's position: reopen the stream now."""


class WorkerFeed:
    def __init__(
        self,
        state: WorkerState,
        tracker: WorkerKvTracker,
        metrics: RouterMetrics | None,
        *,
        max_backoff: float = 10.0,
        tls: Tls = PLAINTEXT,
    ) -> None:
        self._tls = tls
        self.state = state
        self.tracker = tracker
        self._metrics = metrics
        self._max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        self.sessions = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-feed-{self.state.worker_id}")

    def cancel(self) -> asyncio.Task[None] | None:
        if self._task is not None:
            self._task.cancel()
        return self._task

    async def _run(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            delivered = False
            try:
                delivered = await self._session()
                reason = "ended"
            except _Resync:
                reason = ""
            except StreamViolation as exc:
                reason = exc.reason
                log.warning("worker %d broke the KV stream contract: %s", self.state.worker_id, exc)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("worker %d serves no KV event stream; indexing none of it", self.state.worker_id)
                    return
                reason = exc.code().name.lower()
                log.info("KV stream of worker %d failed: %s", self.state.worker_id, exc.code().name)
            except asyncio.CancelledError:
                raise
            except Exception:
                reason = "error"
                log.exception("KV stream of worker %d failed", self.state.worker_id)
            if reason and self._metrics is not None:
                self._metrics.kv_resyncs.labels(reason).inc()
            if not reason:
                continue
            if delivered and time.monotonic() - started >= HEALTHY_AFTER:
                failures = 0
            failures += 1
            delay = min(self._max_backoff, 0.05 * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
            await asyncio.sleep(delay)

    async def _session(self) -> bool:
        """One subscription; returns whether it delivered anything, raises to restart."""
        self.sessions += 1
        delivered = False
        # With mTLS, the handshake fails unless the instance holds a worker certificate.
        async with self._tls.channel(self.state.instance.address, "worker", CHANNEL_OPTIONS) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            await self._describe(stub)
            if not self.state.proven:
                self.state.proven = True
                if self._tls.enabled:
                    log.info("worker %d proved its identity; routing to it", self.state.worker_id)
            self.tracker.stream_restarted()
            call = stub.SubscribeKvEvents(
                worker_pb2.SubscribeKvEventsRequest(resume_from_event_id=self.tracker.resume_from())
            )
            try:
                async for msg in call:
                    delivered = True
                    await self._handle(msg)
            finally:
                call.cancel()
        return delivered

    async def _describe(self, stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> None:
        try:
            reply = await stub.Describe(worker_pb2.DescribeRequest(), timeout=DESCRIBE_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return
        self.state.details = WorkerDetails(
            dp_size=max(1, reply.dp_size),
            total_kv_blocks=reply.model_card.total_kv_blocks,
            max_num_batched_tokens=reply.model_card.max_num_batched_tokens,
            publishes_kv_events=reply.publishes_kv_events,
        )

    async def _handle(self, msg: worker_pb2.SubscribeKvEventsResponse) -> None:
        which = msg.WhichOneof("payload")
        if which == "events":
            events = msg.events.events
            if len(events) > self.tracker.limits.max_batch_events:
                # Not even translated: the size alone breaks the contract.
                self.tracker.reject_batch([e.dp_rank for e in events])
            lost: set[int] = set()
            for start in range(0, len(events), BATCH_SLICE):
                if start:
                    # A large batch is applied in slices, with routing running in between.
                    await asyncio.sleep(0)
                lost |= self.tracker.apply_batch(
                    [event_from_pb(e) for e in events[start : start + BATCH_SLICE]]
                )
            if lost:
                log.info(
                    "worker %d: KV events of rank(s) %s lost, asking for a snapshot",
                    self.state.worker_id,
                    sorted(lost),
                )
                raise _Resync
        elif which == "snapshot":
            part = snapshot_from_pb(msg.snapshot)
            chains = self.tracker.add_snapshot_part(part)
            if chains is not None:
                await self._apply_snapshot(part.dp_rank, part.next_event_id, chains)
        elif which == "load":
            report = load_from_pb(msg.load)
            if report.dp_rank <= self.tracker.limits.max_dp_rank:
                self.state.loads[report.dp_rank] = report
                self.tracker.count("load", "ok")
            else:
                self.tracker.count("load", "bad_rank")

    async def _apply_snapshot(
        self, dp_rank: int, next_event_id: int, chains: Sequence[tuple[Tier | None, Stored]]
    ) -> None:
        tracker = self.tracker
        tracker.begin_snapshot(dp_rank)
        applied = 0
        for tier, stored in chains:
            tracker.apply_snapshot_chain(dp_rank, tier, stored)
            applied += len(stored.block_hashes)
            if applied >= SNAPSHOT_SLICE:
                applied = 0
                # Routing and other workers' streams run between slices of a large snapshot.
                await asyncio.sleep(0)
        tracker.end_snapshot(dp_rank, next_event_id)


class WorkerFeeds:
    """Starts a feed for every worker discovery reports, and purges a worker that leaves."""

    def __init__(
        self,
        workers: WorkerSet,
        scheduler: Scheduler,
        metrics: RouterMetrics | None,
        limits: StreamLimits,
        *,
        apply_kv: bool = True,
        tls: Tls = PLAINTEXT,
    ) -> None:
        self._tls = tls
        self._workers = workers
        self._scheduler = scheduler
        self._metrics = metrics
        self._limits = limits
        self._apply_kv = apply_kv
        self._feeds: dict[int, WorkerFeed] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    def feed(self, worker_id: int) -> WorkerFeed | None:
        return self._feeds.get(worker_id)

    def on_change(self, kind: WatchEventKind, instance: Instance) -> None:
        worker_id = instance.instance_id
        current = self._feeds.get(worker_id)
        if kind is WatchEventKind.REMOVED:
            self._stop(worker_id)
            self._scheduler.forget_worker(worker_id)
            return
        if current is not None and current.state.instance.address == instance.address:
            return
        self._stop(worker_id)
        state = self._workers.get(worker_id)
        if state is None or self._closed:
            return
        tracker = WorkerKvTracker(
            worker_id, self._scheduler.index, self._limits, count=self._count, apply_kv=self._apply_kv
        )
        feed = self._feeds[worker_id] = WorkerFeed(state, tracker, self._metrics, tls=self._tls)
        feed.start()

    def _count(self, event_type: str, status: str) -> None:
        if self._metrics is not None:
            self._metrics.kv_events.labels(event_type, status).inc()

    def _stop(self, worker_id: int) -> None:
        feed = self._feeds.pop(worker_id, None)
        if feed is None:
            return
        task = feed.cancel()
        if task is not None:
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        self._closed = True
        for worker_id in list(self._feeds):
            self._stop(worker_id)
        for task in list(self._stopping):
            with contextlib.suppress(asyncio.CancelledError):
                await task
