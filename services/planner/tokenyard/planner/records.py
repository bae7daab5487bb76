"""Decision records: one per tick, with what the tick saw, predicted and decided, and why."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tokenyard.planner.pools import Pool


class Reason(StrEnum):
    THROUGHPUT = "throughput"
    LOAD = "load"
    HOLD = "hold"
    MIN_REPLICAS = "min_replicas"
    GPU_BUDGET = "gpu_budget"
    MAX_CHANGE = "max_change"
    LAST_GOOD = "last_good"


class State(StrEnum):
    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"
    ADVISORY = "advisory"
    UNCHANGED = "unchanged"
    DEFERRED = "deferred"


class TickKind(StrEnum):
    THROUGHPUT = "throughput"
    LOAD = "load"


@dataclass(frozen=True)
class TrafficStats:
    """Traffic over (or predicted for) one interval; NaN fields when unknown."""

    request_rate: float = math.nan
    isl: float = math.nan
    osl: float = math.nan
    kv_hit_rate: float = math.nan

    def to_json(self) -> dict[str, float | None]:
        return {
            "request_rate_per_s": _num(self.request_rate),
            "avg_isl_tokens": _num(self.isl),
            "avg_osl_tokens": _num(self.osl),
            "kv_hit_rate": _num(self.kv_hit_rate),
        }


@dataclass
class PoolDecision:
    pool: Pool
    current: int
    desired: int
    reason: Reason
    state: State = State.UNCHANGED
    detail: str = ""
    throughput_replicas: int = 0
    ttft_ms: float = math.nan
    itl_ms: float = math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "pool": self.pool.value,
            "current": self.current,
            "desired": self.desired,
            "reason": self.reason.value,
            "state": self.state.value,
            "detail": self.detail,
            "throughput_replicas": self.throughput_replicas,
            "estimated_ttft_ms": _num(self.ttft_ms),
            "estimated_itl_ms": _num(self.itl_ms),
        }


@dataclass
class DecisionRecord:
    decision_id: int
    decided_at_ns: int
    kind: TickKind
    observed: TrafficStats = field(default_factory=TrafficStats)
    predicted: TrafficStats = field(default_factory=TrafficStats)
    observed_ttft_ms: float = math.nan
    observed_itl_ms: float = math.nan
    pools: list[PoolDecision] = field(default_factory=list)
    summary: str = ""
    gpus: int = 0

    def pool(self, pool: Pool) -> PoolDecision | None:
        return next((p for p in self.pools if p.pool is pool), None)

    def desired(self) -> dict[Pool, int]:
        return {p.pool: p.desired for p in self.pools}

    def set_state(self, state: State, detail: str = "") -> None:
        for p in self.pools:
            if p.state is not State.UNCHANGED or state is State.FAILED:
                p.state = state
        if detail:
            self.summary = f"{self.summary}; {detail}" if self.summary else detail

    def to_json(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "decided_at_unix_ns": self.decided_at_ns,
            "kind": self.kind.value,
            "observed": self.observed.to_json(),
            "predicted": self.predicted.to_json(),
            "observed_ttft_ms": _num(self.observed_ttft_ms),
            "observed_itl_ms": _num(self.observed_itl_ms),
            "pools": [p.to_json() for p in self.pools],
            "summary": self.summary,
            "gpus": self.gpus,
        }

    def log_line(self) -> str:
        pools = " ".join(
            f"{p.pool.value}={p.current}->{p.desired}({p.reason.value},{p.state.value})" for p in self.pools
        )
        return f"decision {self.decision_id} [{self.kind.value}] {pools}: {self.summary}"


def _num(value: float) -> float | None:
    """JSON has no NaN: unknown values are null."""
    return None if value is None or not math.isfinite(value) else round(float(value), 4)
