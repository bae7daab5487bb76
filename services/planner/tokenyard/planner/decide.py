"""The decision of one tick, as pure functions: from predicted traffic (throughput loop) or from
the load models' +1/-1 (load loop) to replicas per pool, then minimums, the bound on change per
tick, and the GPU budget, in that order (the minimum may exceed the change bound; the budget is
applied last and is a hard cap).

With both loops on, the throughput loop sets a lower bound and the load loop moves above it: a
throughput tick raises pools to its count but leaves the scale-down to the load loop, a load
tick never goes below the bound. With the load loop off, a throughput tick sets the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenyard.planner.budget import Budget, BudgetError, fit
from tokenyard.planner.load import LoadDecision
from tokenyard.planner.perf import PerfModel
from tokenyard.planner.pools import Mode, Pool
from tokenyard.planner.records import PoolDecision, Reason
from tokenyard.planner.throughput import Demand, Targets, plan


@dataclass(frozen=True)
class Policy:
    mode: Mode
    targets: Targets
    minimums: dict[Pool, int] = field(default_factory=dict)
    max_change: int = 8
    budget: Budget = field(default_factory=Budget)
    queue_aware: bool = True
    throughput_enabled: bool = True
    load_enabled: bool = True
    load_sensitivity: float = 80.0

    def minimum(self, pool: Pool) -> int:
        return self.minimums.get(pool, 1)


@dataclass
class Outcome:
    decisions: list[PoolDecision]
    summary: str
    lower_bound: dict[Pool, int]


def _floor(policy: Policy, current: dict[Pool, int]) -> dict[Pool, int]:
    return {pool: max(policy.minimum(pool), current.get(pool, 0)) for pool in policy.mode.pools}


def finish(
    policy: Policy,
    current: dict[Pool, int],
    wanted: dict[Pool, int],
    reasons: dict[Pool, Reason],
    details: dict[Pool, str],
) -> list[PoolDecision]:
    """Minimums, the change bound and the budget applied to what a loop wanted."""
    out: dict[Pool, PoolDecision] = {}
    for pool in policy.mode.pools:
        cur = current.get(pool, 0)
        want = wanted.get(pool, cur)
        reason, detail = reasons.get(pool, Reason.HOLD), details.get(pool, "")
        lo, hi = cur - policy.max_change, cur + policy.max_change
        bounded = min(max(want, lo), hi)
        if bounded != want:
            detail += f"; change limited to {policy.max_change} per tick ({want} wanted)"
            reason = Reason.MAX_CHANGE
        floor = policy.minimum(pool)
        if bounded < floor:
            detail += f"; raised to the minimum of {floor}"
            bounded, reason = floor, Reason.MIN_REPLICAS
        out[pool] = PoolDecision(pool, cur, bounded, reason, detail=detail.lstrip("; "))
    desired = {pool: d.desired for pool, d in out.items()}
    try:
        fitted = fit(desired, {p: policy.minimum(p) for p in desired}, policy.budget)
    except BudgetError as exc:
        for d in out.values():
            d.desired, d.reason = 0, Reason.GPU_BUDGET
            d.detail = f"configuration error: {exc}"
        return list(out.values())
    if fitted.changed:
        for pool, n in fitted.replicas.items():
            if n != out[pool].desired:
                out[pool].desired, out[pool].reason = n, Reason.GPU_BUDGET
            out[pool].detail = f"{out[pool].detail}; {fitted.detail}".lstrip("; ")
    return list(out.values())


def hold(
    policy: Policy, current: dict[Pool, int], why: str, reason: Reason = Reason.HOLD
) -> list[PoolDecision]:
    floor = _floor(policy, current)
    reasons = {p: reason for p in floor}
    details = {p: why for p in floor}
    return finish(policy, current, floor, reasons, details)


def throughput_tick(
    policy: Policy,
    model: PerfModel | None,
    demand: Demand | None,
    current: dict[Pool, int],
    why_not: str = "",
) -> Outcome:
    """Replicas for the predicted ``demand``; holds when there is no model or no demand."""
    if model is None:
        why = f"perf model not ready{': ' + why_not if why_not else ''}"
        return Outcome(hold(policy, current, why), why, {p: policy.minimum(p) for p in policy.mode.pools})
    if demand is None or not all(math.isfinite(v) for v in (demand.request_rate, demand.isl, demand.osl)):
        why = why_not or "no traffic observed yet"
        return Outcome(hold(policy, current, why), why, {p: policy.minimum(p) for p in policy.mode.pools})
    plans = plan(model, policy.mode, demand, policy.targets, queue_aware=policy.queue_aware)
    bound = {pool: max(policy.minimum(pool), p.replicas) for pool, p in plans.items()}
    wanted = {
        pool: max(bound[pool], current.get(pool, 0)) if policy.load_enabled else bound[pool] for pool in plans
    }
    details = {pool: p.detail for pool, p in plans.items()}
    for pool in plans:
        if policy.load_enabled and wanted[pool] > bound[pool]:
            details[pool] += f"; keeping {wanted[pool]} (the load loop scales down)"
    decisions = finish(policy, current, wanted, {p: Reason.THROUGHPUT for p in plans}, details)
    for d in decisions:
        d.throughput_replicas = plans[d.pool].replicas
        d.ttft_ms, d.itl_ms = plans[d.pool].latency.ttft_ms, plans[d.pool].latency.itl_ms
    summary = "; ".join(f"{d.pool.value}: {d.detail}" for d in decisions)
    return Outcome(decisions, summary, bound)


def load_tick(
    policy: Policy,
    loads: dict[Pool, LoadDecision],
    current: dict[Pool, int],
    lower_bound: dict[Pool, int],
) -> Outcome:
    """Current replicas moved by the load loop's +1/-1, never below the throughput bound."""
    wanted: dict[Pool, int] = {}
    reasons: dict[Pool, Reason] = {}
    details: dict[Pool, str] = {}
    for pool in policy.mode.pools:
        cur = current.get(pool, 0)
        bound = (
            lower_bound.get(pool, policy.minimum(pool)) if policy.throughput_enabled else policy.minimum(pool)
        )
        load = loads.get(pool)
        delta = load.delta if load is not None else 0
        want = max(bound, cur + delta)
        wanted[pool] = want
        details[pool] = load.detail if load is not None else "no load model for this pool"
        if want > cur + delta:
            details[pool] += f"; held at the throughput bound of {bound}"
        reasons[pool] = Reason.LOAD if want != cur else Reason.HOLD
    decisions = finish(policy, current, wanted, reasons, details)
    for d in decisions:
        load = loads.get(d.pool)
        if load is not None:
            d.ttft_ms, d.itl_ms = load.ttft_ms, load.itl_ms
    summary = "; ".join(f"{d.pool.value}: {d.detail}" for d in decisions)
    return Outcome(decisions, summary, dict(lower_bound))
