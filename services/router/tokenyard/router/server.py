"""Router process wiring: discovery watch, worker KV feeds, replica sync, housekeeping, the gRPC service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from tokenyard.api.router.v1 import router_pb2_grpc
from tokenyard.common.service import ServiceRuntime
from tokenyard.router.active import ActiveRequests
from tokenyard.router.config import RouterSettings
from tokenyard.router.index import WorkerRank, make_index
from tokenyard.router.index.approx import ApproximateRecorder
from tokenyard.router.index.tiers import TieredIndex
from tokenyard.router.kv_ingest.feeds import WorkerFeeds
from tokenyard.router.metrics import RouterMetrics
from tokenyard.router.replication.peers import PeerSync
from tokenyard.router.replication.replicas import LifecycleEvent, ReplicaHub, kind
from tokenyard.router.route_queue import RouteQueue
from tokenyard.router.scheduler import RouterConfig, Scheduler
from tokenyard.router.servicer import SERVICE_NAME, RouterServicer
from tokenyard.router.sessions import SessionTable
from tokenyard.router.workers import WorkerSet, WorkerWatch

log = logging.getLogger(__name__)

GAUGE_REFRESH_SECONDS = 1.0


async def _every(seconds: float, job: Callable[[], object]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            job()
        except Exception:
            log.exception("periodic router job failed")


class Router:
    """Everything one router process runs, built from settings; ``serve`` adds the process shell."""

    def __init__(self, settings: RouterSettings, runtime: ServiceRuntime) -> None:
        self.settings = settings
        self.runtime = runtime
        s = settings
        self.metrics = RouterMetrics(runtime.metrics.registry)
        # With mTLS, a worker's record counts once the worker proved it holds a worker certificate.
        self.workers = WorkerSet(require_proof=runtime.tls.enabled)
        self.index = TieredIndex(lambda: make_index(s.index.value, jump=s.index_jump))
        self.active = ActiveRequests(s.active_request_expiry, jump=s.index_jump)
        self.approx = (
            None
            if s.kv_events
            else ApproximateRecorder(
                self.index.device,
                ttl=s.approx_ttl,
                max_blocks=s.approx_max_blocks,
                prune_ratio=s.approx_prune_ratio,
            )
        )
        self.predicted = (
            ApproximateRecorder(
                make_index(s.index.value, jump=s.index_jump),
                ttl=s.predicted_ttl,
                max_blocks=s.approx_max_blocks,
                prune_ratio=s.approx_prune_ratio,
            )
            if s.kv_events and s.predicted_ttl > 0
            else None
        )
        self.hub = ReplicaHub(str(runtime.instance_id))
        self.hub.on_drop = lambda event: self.metrics.replica_events.labels("dropped", kind(event)).inc()
        self.scheduler = Scheduler(
            self.workers,
            self.index,
            self.active,
            RouterConfig(
                default_mode=s.mode.value,
                knobs=s.cost_knobs(),
                busy=s.busy_thresholds(),
                load_report_max_age=s.load_report_max_age,
            ),
            approx=self.approx,
            predicted=self.predicted,
            metrics=self.metrics,
            publish=self._publish,
            sessions=SessionTable(s.session_affinity_ttl, s.max_sessions),
        )
        self.queue = RouteQueue(
            self.scheduler, max_size=s.queue_max_size, max_wait=s.queue_max_wait, metrics=self.metrics
        )
        self.feeds = WorkerFeeds(
            self.workers,
            self.scheduler,
            self.metrics,
            s.stream_limits(),
            apply_kv=s.kv_events,
            tls=runtime.tls,
        )
        self.workers.on_change(self.feeds.on_change)
        self.servicer = RouterServicer(
            self.scheduler,
            self.hub,
            self._next_event_id,
            queue=self.queue,
            release_after=s.client_release_after,
        )
        self.watch = WorkerWatch(runtime.discovery, self.workers)
        self.peers = (
            PeerSync(
                runtime.discovery,
                str(runtime.instance_id),
                self.active,
                self.metrics,
                runtime.tls,
                on_routed=self.scheduler.learn_from_peer,
            )
            if s.replica_sync
            else None
        )
        self._tasks: list[asyncio.Task[None]] = []

    def _publish(self, event: LifecycleEvent) -> None:
        self.hub.publish(event)
        if self.hub.subscribers:
            self.metrics.replica_events.labels("sent", kind(event)).inc()

    def _next_event_id(self, rank: WorkerRank) -> int | None:
        feed = self.feeds.feed(rank.worker_id)
        return feed.tracker.next_event_id(rank.dp_rank) if feed is not None else None

    def start(self) -> None:
        """Start the background work (after the gRPC server is up)."""
        self.watch.start()
        if self.peers is not None:
            self.peers.start()
        jobs: list[tuple[float, Callable[[], object]]] = [
            (min(30.0, self.settings.active_request_expiry / 2), self._expire_active),
            (GAUGE_REFRESH_SECONDS, lambda: self.metrics.refresh(self.workers, self.active, self.index)),
        ]
        if self.approx is not None:
            jobs.append((min(5.0, self.settings.approx_ttl / 4), self.approx.expire))
        if self.predicted is not None:
            jobs.append((min(1.0, self.settings.predicted_ttl / 4), self.predicted.expire))
        self._tasks = [asyncio.create_task(_every(period, job)) for period, job in jobs]

    def _expire_active(self) -> None:
        if gone := self.active.expire():
            log.warning("forgot %d routed requests whose end was never notified", gone)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        closers: list[Callable[[], Awaitable[None]]] = [self.watch.close, self.feeds.close]
        if self.peers is not None:
            closers.append(self.peers.close)
        for close in closers:
            await close()


class RouterServer:
    """One router, serving from ``__aenter__`` until ``__aexit__``."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(settings, service="router", metrics_port=settings.metrics_port)
        self.router = Router(settings, self.runtime)

    @property
    def address(self) -> str:
        return self.runtime.address

    async def __aenter__(self) -> RouterServer:
        await self.runtime.__aenter__()
        try:
            self.runtime.add_servicer(
                router_pb2_grpc.add_RouterServiceServicer_to_server, self.router.servicer, SERVICE_NAME
            )
            await self.runtime.start()
            self.router.start()
            self.runtime.on_close(self.router.close)
        except BaseException as exc:
            await self.runtime.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self.runtime.set_serving(True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Replica and notification streams never end on their own; ending them now keeps them from
        # holding the grace period open (peers reconnect elsewhere or see this router leave
        # discovery; frontends resend what was not acknowledged to another router).
        self.router.hub.close()
        self.router.servicer.close()
        await self.runtime.__aexit__(exc_type, exc, tb)


async def serve(settings: RouterSettings) -> None:
    async with RouterServer(settings) as server:
        await server.runtime.wait_for_shutdown()
