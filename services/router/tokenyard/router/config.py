"""Router settings (env prefix ``TOKENYARD_ROUTER_``)."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from tokenyard.common.settings import MetricsPortSettings, ServiceSettings, settings_config
from tokenyard.router.busy import BusyThresholds
from tokenyard.router.kv_ingest.stream import StreamLimits
from tokenyard.router.policies.cost import CostKnobs
from tokenyard.router.policies.modes import RoutingMode


class IndexKind(StrEnum):
    POSITIONAL = "positional"
    RADIX = "radix"


class RouterSettings(MetricsPortSettings, ServiceSettings):
    model_config = settings_config("router")
    service_name: ClassVar[str] = "router"

    port: int = Field(default=8100, ge=0, le=65535, description="gRPC port (router, health, reflection).")
    metrics_port: int = Field(
        default=8101, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint."
    )
    mode: RoutingMode = Field(
        default=RoutingMode.KV,
        description="How a worker is chosen when the request does not say: kv (cache overlap, load and "
        "cache pressure), kv-classic (overlap and load only), round-robin, random, power-of-two, "
        "least-loaded, direct (the request pins the worker).",
    )
    # -- KV index ----------------------------------------------------------------------------------
    kv_events: bool = Field(
        default=True,
        description="Index the workers' KV event streams; off: approximate mode, the router indexes its "
        "own routing decisions for a while instead.",
    )
    index: IndexKind = Field(
        default=IndexKind.POSITIONAL,
        description="KV index implementation: positional (flat maps, jump search) or radix (reference tree).",
    )
    index_jump: int = Field(
        default=32, ge=1, le=4096, description="Positions the positional index skips per probe."
    )
    approx_ttl: float = Field(
        default=120.0, gt=0, description="Approximate mode: seconds a routed prompt's blocks stay indexed."
    )
    approx_max_blocks: int = Field(
        default=1 << 20, ge=1, description="Approximate mode: recorded blocks kept at most (oldest go first)."
    )
    approx_prune_ratio: float = Field(
        default=0.8, gt=0, le=1, description="Approximate mode: fraction of the bound kept after pruning."
    )
    predicted_ttl: float = Field(
        default=0.0,
        ge=0,
        description="Predict-on-route: seconds a routed prompt counts as cached on its worker before the "
        "worker reports it, so that requests sharing a new prefix follow the first one; 0: off.",
    )
    max_batch_events: int = Field(
        default=10_000,
        ge=1,
        description="Events in one batch from a worker at most; a larger batch is rejected.",
    )
    max_event_blocks: int = Field(
        default=65_536, ge=1, description="Blocks in one KV event at most; a larger event is rejected."
    )
    max_rank_blocks: int = Field(
        default=4_000_000,
        ge=1,
        description="Blocks indexed per worker rank and tier at most; stores beyond it are rejected.",
    )
    # -- cost ----------------------------------------------------------------------------------
    overlap_score_credit: float = Field(
        default=1.0,
        ge=0,
        description="Weight of device-tier cached blocks as prefill credit; 0 ignores the cache.",
    )
    overlap_score_credit_decay: float = Field(
        default=0.0,
        ge=0,
        description="How fast the credit shrinks on workers with more prefill queued than the least.",
    )
    # 2, not the reference's 1: this router's decode term is the larger of its own prediction and
    # the worker's reported load, so it already weighs load more than the reference does. On the
    # shared-prefix benchmark (bench/router_kv_vs_rr.py) 1 sent one prefix in seven away from its
    # cache (TTFT p50 68 ms, hit rate 0.76); 2 keeps affinity (64 ms, 0.87) without piling onto one
    # worker, since the prefill term still counts every queued token twice.
    prefill_load_scale: float = Field(default=2.0, ge=0, description="Weight of prefill load in the cost.")
    decode_active_request_weight: float = Field(
        default=0.0, ge=0, description="Cost per active request, in blocks."
    )
    host_cache_hit_weight: float = Field(
        default=0.75, ge=0, description="Credit per block cached in host memory beyond the device."
    )
    disk_cache_hit_weight: float = Field(
        default=0.25, ge=0, description="Credit per block cached on disk beyond the faster tiers."
    )
    shared_cache_multiplier: float = Field(
        default=0.0, ge=0, description="Credit per block in external/shared storage beyond the device."
    )
    temperature: float = Field(
        default=0.0,
        ge=0,
        description="Selection temperature: 0 picks the lowest cost, higher spreads choices.",
    )
    decode_load_scale: float = Field(
        default=0.5,
        ge=0,
        description="kv mode: weight of the decode term (active, expected output and new blocks) in the cost.",
    )
    eviction_weight: float = Field(
        default=1.0,
        ge=0,
        description="kv mode: cost per reused cached block a placement is forecast to evict.",
    )
    overflow_weight: float = Field(
        default=8.0,
        ge=0,
        description="kv mode: cost per block a placement needs beyond the rank's KV capacity "
        "(with its running requests), where the engine would preempt.",
    )
    track_active_blocks: bool = Field(
        default=True, description="Count active requests' blocks as decode load (off for prefill-only pools)."
    )
    track_prefill_tokens: bool = Field(
        default=True, description="Count prompt tokens until their first token as prefill load."
    )
    load_report_max_age: float = Field(
        default=10.0, gt=0, description="Seconds after which a worker's reported load is ignored."
    )
    # -- busy detection ------------------------------------------------------------------------
    active_decode_blocks_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="A rank is busy above this fraction of its KV blocks in use; unset: off.",
    )
    active_prefill_tokens_threshold: int | None = Field(
        default=None, ge=0, description="A rank is busy above this many prefill tokens in flight; unset: off."
    )
    active_prefill_tokens_threshold_frac: float | None = Field(
        default=None,
        ge=0,
        description="A rank is busy above this fraction of its max_num_batched_tokens in prefill; unset: off.",
    )
    # -- queue and sessions --------------------------------------------------------------------
    queue_max_size: int = Field(
        default=256,
        ge=0,
        description="Requests that may wait in the router queue when every eligible worker is busy; "
        "0: refuse at once (RESOURCE_EXHAUSTED).",
    )
    queue_max_wait: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a request waits in the router queue at most before it is refused.",
    )
    session_affinity_ttl: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a session id stays bound to the worker that served its last turn.",
    )
    max_sessions: int = Field(
        default=100_000, ge=1, description="Session bindings kept at most (least recently used go first)."
    )
    # -- lifecycle and replicas ----------------------------------------------------------------
    active_request_expiry: float = Field(
        default=300.0,
        gt=0,
        description="Seconds after which a routed request whose end was never notified is forgotten.",
    )
    client_release_after: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description=(
            "Seconds after a frontend's notification stream broke (it crashed or was killed) with no "
            "sign of life from it, after which its requests no longer count as active load."
        ),
    )
    replica_sync: bool = Field(
        default=False,
        description="Share routing decisions with the other routers in discovery, so that all predict the same load.",
    )

    def cost_knobs(self) -> CostKnobs:
        return CostKnobs(
            overlap_score_credit=self.overlap_score_credit,
            credit_decay=self.overlap_score_credit_decay,
            prefill_load_scale=self.prefill_load_scale,
            active_request_weight=self.decode_active_request_weight,
            host_cache_hit_weight=self.host_cache_hit_weight,
            disk_cache_hit_weight=self.disk_cache_hit_weight,
            shared_cache_multiplier=self.shared_cache_multiplier,
            temperature=self.temperature,
            track_prefill_tokens=self.track_prefill_tokens,
            track_active_blocks=self.track_active_blocks,
            decode_load_scale=self.decode_load_scale,
            eviction_weight=self.eviction_weight,
            overflow_weight=self.overflow_weight,
        )

    def busy_thresholds(self) -> BusyThresholds:
        return BusyThresholds(
            active_decode_blocks=self.active_decode_blocks_threshold,
            active_prefill_tokens=self.active_prefill_tokens_threshold,
            active_prefill_tokens_frac=self.active_prefill_tokens_threshold_frac,
        )

    def stream_limits(self) -> StreamLimits:
        return StreamLimits(
            max_batch_events=self.max_batch_events,
            max_event_blocks=self.max_event_blocks,
            max_rank_blocks=self.max_rank_blocks,
        )
