"""The worker's own Prometheus metrics (``tokenyard_worker_*``), next to the RPC metrics every service has."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

from tokenyard.common.metrics import Metrics
from tokenyard.worker.engines.base import KvTransferStats, RankLoad

FALLBACK_REASONS = (
    "unreachable",
    "not_found",
    "timeout",
    "layout_mismatch",
    "invalid_response",
    "unsupported",
    "rejected",
    "error",
)
"""Why a decode worker computed a prompt itself instead of importing it (``kv_transfer_fallbacks``):
the source did not answer; it no longer held the transfer (expired, released, unknown); the fetch
ran past its deadline; the blocks have another layout; the stream broke the protocol; the source's
engine has no KV bytes; this engine refused the blocks; anything else."""
_TRANSFER_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
        # -- disaggregation: KV blocks between prefill and decode workers --
        self.kv_transfer_bytes = Counter(
            "tokenyard_worker_kv_transfer_bytes_total",
            "KV bytes of complete transfers: received (fetched and imported by this decode worker) or "
            "sent (served by FetchKvBlocks).",
            ["direction"],
            registry=registry,
        )
        self.kv_transfer_blocks = Counter(
            "tokenyard_worker_kv_transfer_blocks_total",
            "KV blocks of complete transfers, received or sent.",
            ["direction"],
            registry=registry,
        )
        self.kv_transfer_seconds = Histogram(
            "tokenyard_worker_kv_transfer_seconds",
            "Duration of complete transfers: received = fetch and import on the decode worker, sent = "
            "the FetchKvBlocks stream on the prefill worker. Throughput: rate of "
            "tokenyard_worker_kv_transfer_bytes_total over rate of this histogram's _sum, per direction.",
            ["direction"],
            buckets=_TRANSFER_SECONDS_BUCKETS,
            registry=registry,
        )
        self.kv_transfer_fallbacks = Counter(
            "tokenyard_worker_kv_transfer_fallbacks_total",
            "Requests with KV transfer parameters whose fetch failed, so this worker computed the prompt "
            "itself, by reason: unreachable, not_found, timeout, layout_mismatch, invalid_response, "
            "unsupported, rejected, error.",
            ["reason"],
            registry=registry,
        )
        self.kv_transfers_held = Gauge(
            "tokenyard_worker_kv_transfers_held",
            "Prefill side: transfers whose KV blocks are held for a decode worker to fetch.",
            registry=registry,
        )
        self.kv_transfer_blocks_held = Gauge(
            "tokenyard_worker_kv_transfer_blocks_held",
            "Prefill side: KV blocks held for transfers not fetched yet.",
            registry=registry,
        )
        self.kv_transfers_expired = Counter(
            "tokenyard_worker_kv_transfers_expired_total",
            "Prefill side: transfers dropped by the hold timeout because no decode worker fetched them.",
            registry=registry,
        )
        for direction in ("received", "sent"):
            self.kv_transfer_bytes.labels(direction)
            self.kv_transfer_blocks.labels(direction)
            self.kv_transfer_seconds.labels(direction)
        for reason in FALLBACK_REASONS:
            self.kv_transfer_fallbacks.labels(reason)
        self._expired_seen = 0

    def observe_load(self, loads: Sequence[RankLoad]) -> None:
        for load in loads:
            rank = str(load.dp_rank)
            self.kv_blocks_active.labels(rank).set(load.active_blocks)
            self.kv_blocks_total.labels(rank).set(load.total_blocks)
            self.waiting_requests.labels(rank).set(load.waiting)

    def observe_transfer(self, direction: str, *, blocks: int, nbytes: int, seconds: float) -> None:
        """One complete KV transfer, ``received`` or ``sent``."""
        self.kv_transfer_bytes.labels(direction).inc(nbytes)
        self.kv_transfer_blocks.labels(direction).inc(blocks)
        self.kv_transfer_seconds.labels(direction).observe(seconds)

    def observe_transfer_stats(self, stats: KvTransferStats) -> None:
        """The engine's prefill-side transfer state (sampled with the load)."""
        self.kv_transfers_held.set(stats.held_transfers)
        self.kv_transfer_blocks_held.set(stats.held_blocks)
        if stats.expired_transfers > self._expired_seen:
            self.kv_transfers_expired.inc(stats.expired_transfers - self._expired_seen)
        self._expired_seen = stats.expired_transfers
