"""The worker's own Prometheus metrics (``tokenyard_worker_*``), next to the RPC metrics every service has."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge

from tokenyard.common.metrics import Metrics
from tokenyard.worker.engines.base import RankLoad


class WorkerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.requests = Counter(
            "tokenyard_worker_requests_total",
            "Generate requests by how they ended: stop, length, cancelled (by the worker), error, "
            "disconnected (the caller cancelled) or rejected (never started).",
            ["reason"],
            registry=registry,
        )
        self.active_requests = Gauge(
            "tokenyard_worker_active_requests", "Generate requests in flight.", registry=registry
        )
        self.generated_tokens = Counter(
            "tokenyard_worker_generated_tokens_total", "Output tokens streamed to callers.", registry=registry
        )
        self.kv_blocks_active = Gauge(
            "tokenyard_worker_kv_blocks_active",
            "KV blocks referenced by running requests, per dp_rank.",
            ["dp_rank"],
            registry=registry,
        )
        self.kv_blocks_total = Gauge(
            "tokenyard_worker_kv_blocks_total",
            "Capacity of the device KV pool, in blocks, per dp_rank.",
            ["dp_rank"],
            registry=registry,
        )
        self.waiting_requests = Gauge(
            "tokenyard_worker_waiting_requests",
            "Requests admitted but not yet scheduled, per dp_rank.",
            ["dp_rank"],
            registry=registry,
        )
        self.kv_events = Counter(
            "tokenyard_worker_kv_events_published_total",
            "KV events published, per dp_rank and kind (stored, removed, cleared).",
            ["dp_rank", "kind"],
            registry=registry,
        )
        self.kv_subscribers = Gauge(
            "tokenyard_worker_kv_subscribers", "Open KV event streams.", registry=registry
        )
        self.kv_resyncs = Counter(
            "tokenyard_worker_kv_subscriber_resyncs_total",
            "Times a KV event subscriber fell too far behind and was sent a fresh snapshot instead.",
            registry=registry,
        )
        self.draining = Gauge("tokenyard_worker_draining", "1 once a drain began.", registry=registry)

    def observe_load(self, loads: Sequence[RankLoad]) -> None:
        for load in loads:
            rank = str(load.dp_rank)
            self.kv_blocks_active.labels(rank).set(load.active_blocks)
            self.kv_blocks_total.labels(rank).set(load.total_blocks)
            self.waiting_requests.labels(rank).set(load.waiting)
