"""Throughput-based scaling: replicas per pool for the predicted traffic of the next interval.

The rules follow the reference planner (``dynamo-behavior.md`` §5.2):

* prefill: ``eff_isl = ceil(isl * (1 - min(0.95, kv_hit_rate)))``; one worker sustains
  ``1 / prefill_time(eff_isl)`` requests per second; ``replicas = ceil(rps / that)``.
* decode: the largest batch ``b`` (at most ``max_kv_tokens / context`` and ``max_num_seqs``)
  whose step time at context ``isl + osl // 2`` stays within the ITL target; one worker sustains
  ``b / (osl * step_time)`` requests per second.
* aggregated: one worker does both, in turn: ``1 / (prefill_time + osl * step_time / b)``.

Those counts keep each worker's utilisation at or below 1; they say nothing about queueing. With
``queue_aware`` the count is then raised until the latency estimates below meet the targets:
prefill as an M/D/1 queue (``ttft = s + rho * s / (2 * (1 - rho))``), decode at the batch the
load settles at (``b = rps_per_worker * osl * itl(b)``, solved by iteration), aggregated with
decode steps stretched by the prefill share of the worker's time (``itl / (1 - rho_prefill)``).
The same estimates are what the dry run plots against the targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenyard.planner.perf import PerfModel
from tokenyard.planner.pools import Mode, Pool

MAX_HIT_RATE = 0.95
"""A cache never makes a prompt free: the reference caps the hit rate it credits."""


@dataclass(frozen=True)
class Targets:
    ttft_ms: float
    itl_ms: float


@dataclass(frozen=True)
class Demand:
    """Traffic for one interval: request rate (per second), mean ISL and OSL (tokens), hit rate."""

    request_rate: float
    isl: float
    osl: float
    kv_hit_rate: float = 0.0

    @property
    def context(self) -> float:
        """Mean context length while decoding: the prompt plus half the output."""
        return self.isl + self.osl // 2


@dataclass(frozen=True)
class Latency:
    """Estimated mean latencies, ms; NaN where the pool has no say (ITL of a prefill pool)."""

    ttft_ms: float = math.nan
    itl_ms: float = math.nan

    def within(self, targets: Targets) -> bool:
        ttft_ok = math.isnan(self.ttft_ms) or self.ttft_ms <= targets.ttft_ms
        itl_ok = math.isnan(self.itl_ms) or self.itl_ms <= targets.itl_ms
        return ttft_ok and itl_ok


@dataclass(frozen=True)
class PoolPlan:
    pool: Pool
    replicas: int
    """What the traffic needs, before minimums, the change bound and the budget (0 without traffic)."""
    engine_rps: float
    """Requests per second one worker sustains."""
    latency: Latency
    """Estimated with ``replicas`` workers (at least one)."""
    detail: str


def effective_isl(isl: float, kv_hit_rate: float) -> int:
    hit = min(MAX_HIT_RATE, max(0.0, kv_hit_rate))
    # Rounded first so that float noise (3000 * 0.05 = 150.00000000000003) does not add a token.
    return math.ceil(round(isl * (1 - hit), 6))


def prefill_capacity(model: PerfModel, demand: Demand) -> tuple[int, float, float]:
    """``(eff_isl, prefill_ms, engine_rps)`` of one prefill worker."""
    eff = effective_isl(demand.isl, demand.kv_hit_rate)
    wall = model.prefill_ms(eff)
    return eff, wall, (1000.0 / wall if wall > 0 else math.inf)


def decode_batch(model: PerfModel, context: float, itl_target_ms: float) -> tuple[int, float]:
    """The largest batch whose step time meets the ITL target at ``context``, and that step time.

    When even one request misses the target, the answer is one request (and its step time):
    more workers cannot make a single request faster.
    """
    upper = max(1, min(int(model.max_kv_tokens // max(1.0, context)), model.max_num_seqs))
    if model.itl_ms(1, context) > itl_target_ms:
        return 1, model.itl_ms(1, context)
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if model.itl_ms(mid, context) <= itl_target_ms:
            lo = mid
        else:
            hi = mid - 1
    return lo, model.itl_ms(lo, context)


def decode_capacity(model: PerfModel, demand: Demand, targets: Targets) -> tuple[int, float, float]:
    """``(batch, step_ms, engine_rps)`` of one decode worker."""
    batch, step = decode_batch(model, demand.context, targets.itl_ms)
    osl = max(1.0, demand.osl)
    return batch, step, batch / (osl * step / 1000.0)


def _replicas(rate: float, engine_rps: float) -> int:
    if rate <= 0:
        return 0
    return math.ceil(rate / engine_rps - 1e-9)


# ---- latency estimates ---------------------------------------------------------------------------


def _md1_ttft(service_ms: float, rho: float) -> float:
    if rho >= 1:
        return math.inf
    return service_ms + rho * service_ms / (2 * (1 - rho))


def _settled_batch(model: PerfModel, per_worker_rps: float, demand: Demand, stretch: float) -> float:
    """The batch a decode worker settles at: ``b = rate * osl * itl(b) * stretch`` (Little's law)."""
    osl = max(1.0, demand.osl)
    b = 1.0
    for _ in range(60):
        nxt = per_worker_rps * osl * model.itl_ms(max(1.0, b), demand.context) * stretch / 1000.0
        if abs(nxt - b) < 1e-3:
            return nxt
        b = nxt
        if b > 1e6:
            return math.inf
    return b


def _batch_fits(model: PerfModel, batch: float, context: float) -> bool:
    return batch <= model.max_num_seqs and batch * context <= model.max_kv_tokens


def estimate(model: PerfModel, pool: Pool, demand: Demand, replicas: int) -> Latency:
    """Mean TTFT and/or ITL of ``pool`` with ``replicas`` workers at ``demand``."""
    n = max(1, replicas)
    rate = max(0.0, demand.request_rate) / n
    _, prefill_ms, _ = prefill_capacity(model, demand)
    if pool is Pool.PREFILL:
        return Latency(ttft_ms=_md1_ttft(prefill_ms, rate * prefill_ms / 1000.0))
    if pool is Pool.DECODE:
        b = _settled_batch(model, rate, demand, 1.0)
        if not _batch_fits(model, b, demand.context):
            return Latency(itl_ms=math.inf)
        return Latency(itl_ms=model.itl_ms(max(1.0, b), demand.context))
    rho = rate * prefill_ms / 1000.0
    if rho >= 1:
        return Latency(math.inf, math.inf)
    stretch = 1 / (1 - rho)
    b = _settled_batch(model, rate, demand, stretch)
    if not _batch_fits(model, b, demand.context):
        return Latency(math.inf, math.inf)
    step = model.itl_ms(max(1.0, b), demand.context)
    # A new prompt waits for the prefills ahead of it and for the decode step under way.
    return Latency(ttft_ms=_md1_ttft(prefill_ms, rho) + step / 2, itl_ms=step * stretch)


# ---- replicas ------------------------------------------------------------------------------------


def plan_pool(
    model: PerfModel, pool: Pool, demand: Demand, targets: Targets, *, queue_aware: bool = False
) -> PoolPlan:
    if pool is Pool.PREFILL:
        eff, wall, engine = prefill_capacity(model, demand)
        detail = f"eff_isl {eff} -> prefill {wall:.1f} ms, {engine:.3g} req/s per worker"
    elif pool is Pool.DECODE:
        batch, step, engine = decode_capacity(model, demand, targets)
        detail = (
            f"batch {batch} at context {demand.context:.0f} -> step {step:.1f} ms, "
            f"{engine:.3g} req/s per worker"
        )
    else:
        eff, wall, _ = prefill_capacity(model, demand)
        batch, step, _ = decode_capacity(model, demand, targets)
        osl = max(1.0, demand.osl)
        engine = 1.0 / (wall / 1000.0 + osl * step / 1000.0 / batch)
        detail = (
            f"prefill {wall:.1f} ms (eff_isl {eff}) + decode batch {batch} step {step:.1f} ms "
            f"-> {engine:.3g} req/s per worker"
        )
    replicas = _replicas(demand.request_rate, engine)
    latency = estimate(model, pool, demand, replicas)
    if queue_aware and demand.request_rate > 0 and not latency.within(targets):
        first = max(1, replicas)
        for n in range(first + 1, 2 * first + 17):
            candidate = estimate(model, pool, demand, n)
            if candidate.within(targets):
                detail += f"; {n - replicas} more for queueing"
                replicas, latency = n, candidate
                break
        else:
            detail += "; the targets are out of reach at any count (slower than one request alone)"
    rate = demand.request_rate
    return PoolPlan(pool, replicas, engine, latency, f"{rate:.3g} req/s: {detail} -> {replicas}")


def plan(
    model: PerfModel, mode: Mode, demand: Demand, targets: Targets, *, queue_aware: bool = False
) -> dict[Pool, PoolPlan]:
    return {pool: plan_pool(model, pool, demand, targets, queue_aware=queue_aware) for pool in mode.pools}
