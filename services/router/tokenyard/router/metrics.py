"""The router's domain metrics (``tokenyard_router_*``), on the service's registry.

Per-decision metrics are observed inline (a few microseconds each); per-worker gauges are
refreshed from the event loop once a second, so that a scrape (on the metrics thread) never
walks structures the loop is mutating.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenyard.router.active import ActiveRequests
from tokenyard.router.index.tiers import Tier, TieredIndex
from tokenyard.router.workers import WorkerSet

# Routing stages take microseconds to a millisecond or two.
STAGE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
FRACTION_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 131072)
STAGES = ("hashing", "index_lookup", "scoring", "total")
POOLS = ("aggregated", "prefill", "decode")


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        self.decisions = Counter(
            "tokenyard_router_decisions_total",
            "Routing decisions, by the mode that decided.",
            ["mode"],
            registry=r,
        )
        self.rejections = Counter(
            "tokenyard_router_rejections_total",
            "Route calls refused: overloaded (all eligible workers busy, no queue), queue_full, "
            "queue_timeout, queue_deadline (the router queue), unavailable (no eligible worker), invalid.",
            ["reason"],
            registry=r,
        )
        self.kv_hit_rate = Histogram(
            "tokenyard_router_kv_hit_rate",
            "Fraction of the prompt's blocks predicted cached on the chosen worker, at routing.",
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "tokenyard_router_overhead_seconds",
            "Time one routing decision spends, by stage: hashing (sequence hashes), index_lookup "
            "(KV and active-block overlap), scoring (cost and selection), total.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self._stage = {stage: self.overhead.labels(stage) for stage in STAGES}
        self.non_max_overlap = Counter(
            "tokenyard_router_non_max_overlap_selections_total",
            "Decisions that chose a worker with less cached overlap than the best eligible one.",
            registry=r,
        )
        self.overlap_blocks_lost = Histogram(
            "tokenyard_router_overlap_blocks_lost",
            "Best eligible overlap minus the chosen worker's overlap, in blocks.",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.input_tokens = Histogram(
            "tokenyard_router_input_sequence_tokens",
            "Prompt length of routed requests, in tokens.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "tokenyard_router_queue_pending_requests",
            "Requests waiting in the router queue for a worker below its busy thresholds.",
            registry=r,
        )
        self.queue_wait = Histogram(
            "tokenyard_router_queue_wait_seconds",
            "How long routed requests waited in the router queue.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.session_routes = Counter(
            "tokenyard_router_session_routes_total",
            "Requests with a session id: followed (to the worker holding its history), moved "
            "(its worker's KV cache could not hold the turn beside its running requests), placed "
            "(a new session, or its worker busy or gone).",
            ["outcome"],
            registry=r,
        )
        self.evicted_hot_blocks = Histogram(
            "tokenyard_router_evicted_hot_blocks",
            "kv mode: reused blocks the chosen placement is forecast to evict.",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "tokenyard_router_time_to_first_token_seconds",
            "From the routing decision to the first-token notification.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.kv_events = Counter(
            "tokenyard_router_kv_events_applied_total",
            "KV events and snapshots from workers, by type (stored, removed, cleared, snapshot, "
            "batch, load) and status (ok, or why it was rejected).",
            ["event_type", "status"],
            registry=r,
        )
        self.kv_resyncs = Counter(
            "tokenyard_router_kv_resyncs_total",
            "Worker KV streams restarted to repair a rank's index, by reason.",
            ["reason"],
            registry=r,
        )
        self.replica_events = Counter(
            "tokenyard_router_replica_events_total",
            "Replica-sync events, by direction (sent, received, dropped, lost) and kind.",
            ["direction", "kind"],
            registry=r,
        )
        self.active_requests = Gauge(
            "tokenyard_router_active_requests", "Requests routed and not yet finished.", registry=r
        )
        self.indexed_blocks = Gauge(
            "tokenyard_router_indexed_blocks",
            "Blocks in the KV index, by storage tier.",
            ["tier"],
            registry=r,
        )
        self.workers_registered = Gauge(
            "tokenyard_router_workers_registered", "Workers known from discovery.", registry=r
        )
        labels = ["worker_id", "dp_rank"]
        self.worker_active_blocks = Gauge(
            "tokenyard_router_worker_active_decode_blocks",
            "Predicted KV blocks referenced by requests active on the rank.",
            labels,
            registry=r,
        )
        self.worker_prefill_tokens = Gauge(
            "tokenyard_router_worker_active_prefill_tokens",
            "Predicted prompt tokens still to prefill on the rank.",
            labels,
            registry=r,
        )
        self.worker_requests = Gauge(
            "tokenyard_router_worker_active_requests",
            "Requests routed to the rank and active.",
            labels,
            registry=r,
        )
        self.worker_reported_blocks = Gauge(
            "tokenyard_router_worker_reported_active_blocks",
            "Active KV blocks the rank last reported.",
            labels,
            registry=r,
        )
        self.worker_reported_prefill = Gauge(
            "tokenyard_router_worker_reported_prefill_tokens",
            "Prefill tokens the rank last reported.",
            labels,
            registry=r,
        )
        self._worker_gauges = (
            self.worker_active_blocks,
            self.worker_prefill_tokens,
            self.worker_requests,
            self.worker_reported_blocks,
            self.worker_reported_prefill,
        )
        self._labelled: set[tuple[str, str]] = set()
        # Per pool: the role of the workers (aggregated, prefill, decode).
        self.pool_decisions = Counter(
            "tokenyard_router_pool_decisions_total",
            "Routing decisions, by the pool (role) of the worker chosen.",
            ["pool"],
            registry=r,
        )
        self._pool_decisions = {role: self.pool_decisions.labels(role) for role in POOLS}
        self.pool_workers = Gauge(
            "tokenyard_router_pool_workers", "Workers known from discovery, by pool.", ["pool"], registry=r
        )
        self.pool_requests = Gauge(
            "tokenyard_router_pool_active_requests",
            "Requests routed to the pool's workers and active.",
            ["pool"],
            registry=r,
        )
        self.pool_prefill_tokens = Gauge(
            "tokenyard_router_pool_active_prefill_tokens",
            "Predicted prompt tokens still to prefill on the pool's workers (the decode pool's "
            "requests are prefilled elsewhere and count none).",
            ["pool"],
            registry=r,
        )
        self.pool_active_blocks = Gauge(
            "tokenyard_router_pool_active_decode_blocks",
            "Predicted KV blocks referenced by requests active on the pool's workers (the prefill "
            "pool's requests never decode and count none).",
            ["pool"],
            registry=r,
        )

    def stage(self, name: str, seconds: float) -> None:
        self._stage[name].observe(seconds)

    def pool_decision(self, role: str) -> None:
        counter = self._pool_decisions.get(role)
        if counter is not None:
            counter.inc()

    def refresh(self, workers: WorkerSet, active: ActiveRequests, index: TieredIndex) -> None:
        """Bring the gauges up to date (call from the event loop)."""
        self.active_requests.set(len(active))
        self.workers_registered.set(len(workers))
        for tier in Tier:
            kv = index.tiers.get(tier)
            self.indexed_blocks.labels(tier.name.lower()).set(kv.num_blocks() if kv is not None else 0)
        seen: set[tuple[str, str]] = set()
        loads = active.loads()
        pools = {role: [0, 0, 0, 0] for role in POOLS}
        for state in workers.all():
            pool = pools.get(state.role)
            if pool is not None:
                pool[0] += 1
            for rank in range(state.dp_size):
                key = (str(state.worker_id), str(rank))
                seen.add(key)
                load = loads.get((state.worker_id, rank))  # type: ignore[call-overload]
                report = state.loads.get(rank)
                self.worker_active_blocks.labels(*key).set(load.active_blocks if load else 0)
                self.worker_prefill_tokens.labels(*key).set(load.active_prefill_tokens if load else 0)
                self.worker_requests.labels(*key).set(load.active_requests if load else 0)
                self.worker_reported_blocks.labels(*key).set(report.active_blocks if report else 0)
                self.worker_reported_prefill.labels(*key).set(report.active_prefill_tokens if report else 0)
                if pool is not None and load is not None:
                    pool[1] += load.active_requests
                    pool[2] += load.active_prefill_tokens
                    pool[3] += load.active_blocks
        for role, (count, requests, prefill, blocks) in pools.items():
            self.pool_workers.labels(role).set(count)
            self.pool_requests.labels(role).set(requests)
            self.pool_prefill_tokens.labels(role).set(prefill)
            self.pool_active_blocks.labels(role).set(blocks)
        for key in self._labelled - seen:
            for gauge in self._worker_gauges:
                gauge.remove(*key)
        self._labelled = seen
