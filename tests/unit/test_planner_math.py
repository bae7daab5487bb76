"""The decision math of the throughput loop (§5.2), the budget (§5.6), the load loop (§5.4) and
the order in which minimums, the change bound and the budget apply, on worked examples."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from tokenyard.planner.budget import Budget, BudgetError, fit
from tokenyard.planner.decide import Policy, load_tick, throughput_tick
from tokenyard.planner.load import Limits, LoadDecision, LoadModel, StepSample, Traffic
from tokenyard.planner.pools import Mode, Pool
from tokenyard.planner.records import Reason
from tokenyard.planner.throughput import (
    Demand,
    Targets,
    decode_batch,
    decode_capacity,
    effective_isl,
    estimate,
    plan_pool,
    prefill_capacity,
)

pytestmark = pytest.mark.unit


@dataclass
class Linear:
    """prefill = 10 + 0.01 * tokens ms; decode step = 5 + 0.001 * batch * context ms."""

    max_kv_tokens: int = 100_000
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192

    def prefill_ms(self, tokens: float) -> float:
        return 10 + 0.01 * tokens if tokens > 0 else 0.0

    def itl_ms(self, concurrency: float, context: float) -> float:
        return 5 + 0.001 * max(1.0, concurrency) * context


TARGETS = Targets(ttft_ms=500, itl_ms=50)


# ---- §5.2 worked examples ------------------------------------------------------------------------


def test_effective_isl_caps_the_hit_rate_at_95_percent() -> None:
    assert effective_isl(3000, 0.5) == 1500
    assert effective_isl(3000, 0.99) == 150
    assert effective_isl(3000, -1) == 3000


def test_prefill_replicas() -> None:
    # eff_isl 1500 -> 10 + 15 = 25 ms -> 40 req/s per worker; 100 req/s -> ceil(2.5) = 3.
    demand = Demand(request_rate=100, isl=3000, osl=150, kv_hit_rate=0.5)
    eff, wall, rps = prefill_capacity(Linear(), demand)
    assert (eff, wall, rps) == (1500, 25.0, 40.0)
    assert plan_pool(Linear(), Pool.PREFILL, demand, TARGETS).replicas == 3
    # A 99 % hit rate is credited as 95 %: eff_isl 150 -> 11.5 ms -> 86.96 req/s -> 2.
    cached = Demand(100, 3000, 150, 0.99)
    assert plan_pool(Linear(), Pool.PREFILL, cached, TARGETS).replicas == 2


def test_decode_batch_is_the_largest_within_the_itl_target() -> None:
    # context = 3000 + 150 // 2 = 3075; 5 + 0.001 * b * 3075 <= 50  ->  b = 14 (48.05 ms).
    b, step = decode_batch(Linear(), 3075, 50)
    assert b == 14 and step == pytest.approx(48.05)
    demand = Demand(10, 3000, 150)
    _, _, rps = decode_capacity(Linear(), demand, TARGETS)
    assert rps == pytest.approx(14 / (150 * 0.04805))  # 1.9424 req/s per worker
    assert plan_pool(Linear(), Pool.DECODE, demand, TARGETS).replicas == 6  # ceil(10 / 1.9424)


def test_decode_batch_is_bounded_by_kv_and_max_num_seqs() -> None:
    assert decode_batch(Linear(max_kv_tokens=40_000), 3075, 50)[0] == 13  # 40000 // 3075
    assert decode_batch(Linear(max_num_seqs=4), 3075, 50)[0] == 4


def test_decode_batch_when_one_request_already_misses_the_target() -> None:
    b, step = decode_batch(Linear(), 3075, 5)
    assert b == 1 and step == pytest.approx(8.075)


def test_aggregated_replicas_share_one_worker_between_prefill_and_decode() -> None:
    # prefill 40 ms + 150 tokens at 48.05 ms per step of 14 -> 1 / 0.554821 = 1.8024 req/s.
    demand = Demand(10, 3000, 150)
    plan = plan_pool(Linear(), Pool.AGGREGATED, demand, TARGETS)
    assert plan.engine_rps == pytest.approx(1 / (0.040 + 150 * 0.04805 / 14))
    assert plan.replicas == 6


def test_no_traffic_needs_no_replicas() -> None:
    assert plan_pool(Linear(), Pool.DECODE, Demand(0, 3000, 150), TARGETS).replicas == 0


def test_queue_aware_adds_replicas_until_the_ttft_estimate_meets_the_target() -> None:
    # 100 req/s of 25 ms prefills: 3 workers run at rho = 0.83, an M/D/1 TTFT of 87.5 ms.
    demand = Demand(100, 3000, 150, 0.5)
    tight = Targets(ttft_ms=40, itl_ms=50)
    plain = plan_pool(Linear(), Pool.PREFILL, demand, tight)
    aware = plan_pool(Linear(), Pool.PREFILL, demand, tight, queue_aware=True)
    assert plain.replicas == 3 and plain.latency.ttft_ms == pytest.approx(
        25 + (2.5 / 3) * 25 / (2 * (1 - 2.5 / 3))
    )
    # rho <= 2x / (1 + 2x) with x = 40 / 25 - 1 = 0.6  ->  rho <= 0.5455  ->  n >= 4.58  ->  5.
    assert aware.replicas == 5
    assert aware.latency.ttft_ms <= 40


def test_estimates() -> None:
    demand = Demand(10, 3000, 150)
    assert math.isinf(estimate(Linear(), Pool.PREFILL, Demand(100, 3000, 150), 1).ttft_ms)
    itl = estimate(Linear(), Pool.DECODE, demand, 6).itl_ms
    assert 5 < itl <= 50
    agg = estimate(Linear(), Pool.AGGREGATED, demand, 8)
    assert agg.ttft_ms > 40 and agg.itl_ms > estimate(Linear(), Pool.DECODE, demand, 8).itl_ms


# ---- §5.6 budget ---------------------------------------------------------------------------------

SPLIT = Budget(max_gpus=10, gpus_per_replica={Pool.PREFILL: 1, Pool.DECODE: 2})


def test_over_the_budget_both_pools_shrink_in_proportion() -> None:
    # 6 + 4 * 2 = 14 GPUs > 10: scale 10/14; prefill max(1, min((10 - 2) // 1, floor(6 * 0.714))) = 4;
    # decode max(1, (10 - 4) // 2) = 3; 4 + 6 = 10.
    fitted = fit({Pool.PREFILL: 6, Pool.DECODE: 4}, {Pool.PREFILL: 1, Pool.DECODE: 1}, SPLIT)
    assert fitted.changed and fitted.replicas == {Pool.PREFILL: 4, Pool.DECODE: 3}


def test_the_budget_never_cuts_below_the_minimums() -> None:
    fitted = fit({Pool.PREFILL: 9, Pool.DECODE: 4}, {Pool.PREFILL: 1, Pool.DECODE: 3}, SPLIT)
    assert fitted.replicas[Pool.DECODE] >= 3 and SPLIT.total(fitted.replicas) <= 10


def test_minimums_that_do_not_fit_are_a_configuration_error() -> None:
    with pytest.raises(BudgetError, match="need 11 GPUs but the budget allows 10"):
        fit({Pool.PREFILL: 5, Pool.DECODE: 3}, {Pool.PREFILL: 5, Pool.DECODE: 3}, SPLIT)


def test_under_the_floor_both_pools_grow() -> None:
    budget = Budget(max_gpus=20, min_gpus=10, gpus_per_replica={Pool.PREFILL: 1, Pool.DECODE: 2})
    # 2 + 2 * 2 = 6 < 10 - tolerance 2: prefill max(2, ceil(2 * 10 / 6)) = 4; decode ceil((10 - 4) / 2) = 3.
    fitted = fit({Pool.PREFILL: 2, Pool.DECODE: 2}, {Pool.PREFILL: 1, Pool.DECODE: 1}, budget)
    assert fitted.replicas == {Pool.PREFILL: 4, Pool.DECODE: 3}
    # Within the tolerance band nothing moves: 4 + 2 * 2 = 8 >= 10 - 2.
    assert not fit({Pool.PREFILL: 4, Pool.DECODE: 2}, {}, budget).changed


def test_one_pool_budget() -> None:
    budget = Budget(max_gpus=5, gpus_per_replica={Pool.AGGREGATED: 2})
    assert fit({Pool.AGGREGATED: 4}, {Pool.AGGREGATED: 1}, budget).replicas == {Pool.AGGREGATED: 2}


# ---- minimums, change bound, budget: the order ----------------------------------------------------


def policy(**kw: object) -> Policy:
    values: dict[str, object] = {"mode": Mode.DISAGGREGATED, "targets": TARGETS, "load_enabled": False}
    values.update(kw)
    return Policy(**values)  # type: ignore[arg-type]


def test_throughput_tick_applies_minimums_change_bound_and_budget() -> None:
    demand = Demand(100, 3000, 150, 0.5)  # prefill wants 3, decode wants 52
    current = {Pool.PREFILL: 1, Pool.DECODE: 1}
    out = throughput_tick(policy(max_change=4, budget=Budget(max_gpus=0)), Linear(), demand, current)
    got = {d.pool: d for d in out.decisions}
    assert got[Pool.PREFILL].desired == 3 and got[Pool.PREFILL].reason is Reason.THROUGHPUT
    assert got[Pool.DECODE].desired == 5 and got[Pool.DECODE].reason is Reason.MAX_CHANGE
    assert got[Pool.DECODE].throughput_replicas == 52
    capped = throughput_tick(policy(max_change=100, budget=Budget(max_gpus=20)), Linear(), demand, current)
    assert sum(d.desired for d in capped.decisions) == 20
    assert any(d.reason is Reason.GPU_BUDGET for d in capped.decisions)


def test_the_minimum_may_exceed_the_change_bound() -> None:
    out = throughput_tick(
        policy(max_change=1, minimums={Pool.PREFILL: 4, Pool.DECODE: 1}),
        Linear(),
        Demand(1, 100, 10),
        {Pool.PREFILL: 0, Pool.DECODE: 1},
    )
    prefill = next(d for d in out.decisions if d.pool is Pool.PREFILL)
    assert prefill.desired == 4 and prefill.reason is Reason.MIN_REPLICAS


def test_holds_without_a_model_or_traffic() -> None:
    current = {Pool.PREFILL: 2, Pool.DECODE: 3}
    for model, demand in ((None, Demand(1, 100, 10)), (Linear(), None)):
        out = throughput_tick(policy(), model, demand, current)
        assert {d.pool: d.desired for d in out.decisions} == current
        assert all(d.reason is Reason.HOLD for d in out.decisions)


def test_with_the_load_loop_on_a_throughput_tick_raises_but_never_lowers() -> None:
    out = throughput_tick(
        policy(load_enabled=True), Linear(), Demand(1, 100, 10), {Pool.PREFILL: 5, Pool.DECODE: 5}
    )
    assert all(d.desired == 5 for d in out.decisions)
    assert out.lower_bound == {Pool.PREFILL: 1, Pool.DECODE: 1}


def test_load_tick_moves_by_one_above_the_throughput_bound() -> None:
    loads = {
        Pool.PREFILL: LoadDecision(Pool.PREFILL, +1, 900, math.nan, "over"),
        Pool.DECODE: LoadDecision(Pool.DECODE, -1, math.nan, 10, "under"),
    }
    out = load_tick(
        policy(load_enabled=True), loads, {Pool.PREFILL: 2, Pool.DECODE: 3}, {Pool.PREFILL: 1, Pool.DECODE: 3}
    )
    got = {d.pool: d for d in out.decisions}
    assert got[Pool.PREFILL].desired == 3 and got[Pool.PREFILL].reason is Reason.LOAD
    assert got[Pool.DECODE].desired == 3 and "throughput bound" in got[Pool.DECODE].detail


# ---- §5.4 load regressions and decisions ---------------------------------------------------------


def prefill_steps(model: LoadModel, worker: int, queued: int) -> None:
    for tokens in (256, 512, 1024, 2048, 4096, 8192, 300, 700):
        model.observe(
            StepSample(
                worker,
                5 + 0.01 * tokens,
                prefill_requests=1,
                prefill_tokens=tokens,
                queued_prefill_tokens=queued,
            )
        )


def test_prefill_regression_learns_the_step_time() -> None:
    model = LoadModel(Pool.PREFILL)
    assert not model.ready()
    prefill_steps(model, 1, 0)
    assert model.ready()
    assert model.regression.intercept == pytest.approx(5)
    assert model.regression.coef[0] == pytest.approx(0.01)
    # TTFT of a new 1000-token prompt behind 20000 queued tokens, in 8192-token chunks:
    # 21000 = 2 x 8192 + 4616 -> 2 x 86.92 + 51.16 = 225.0 ms.
    assert model.ttft_ms(20000, Traffic(1000, 100)) == pytest.approx(2 * (5 + 81.92) + 5 + 46.16)


def test_negative_token_coefficients_reject_the_model() -> None:
    model = LoadModel(Pool.PREFILL)
    for tokens in (100, 200, 400, 800, 1600, 3200):
        model.observe(StepSample(1, 100 - 0.01 * tokens, prefill_tokens=tokens))
    assert not model.ready() and "negative coefficient" in model.regression.reason


def test_idle_heartbeats_are_ignored() -> None:
    model = LoadModel(Pool.PREFILL)
    for _ in range(10):
        model.observe(StepSample(1, 0.0))
    assert not model.ready()


def test_bucketed_store_keeps_heavy_steps_through_a_quiet_spell() -> None:
    model = LoadModel(Pool.PREFILL, max_samples=16)
    model.observe(StepSample(1, 90, prefill_tokens=8192))
    for _ in range(100):
        model.observe(StepSample(1, 6, prefill_tokens=100))
    x, _ = model.regression.store.rows()
    assert 8192 in x[:, 0] and len(x) == 16


def test_prefill_scales_up_when_every_worker_breaks_the_target() -> None:
    model = LoadModel(Pool.PREFILL)
    prefill_steps(model, 1, 60000)
    prefill_steps(model, 2, 60000)
    decision = model.decide([1, 2], Traffic(1000, 100), Targets(500, 50), 80)
    assert decision.delta == +1 and decision.ttft_ms > 500
    # One comfortable worker is enough to hold.
    prefill_steps(model, 2, 0)
    assert model.decide([1, 2], Traffic(1000, 100), Targets(500, 50), 80).delta == 0


def test_prefill_scales_down_only_when_one_fewer_stays_comfortable() -> None:
    model = LoadModel(Pool.PREFILL)
    for w in (1, 2, 3):
        prefill_steps(model, w, 0)
    assert model.decide([1, 2, 3], Traffic(1000, 100), Targets(500, 50), 80).delta == -1
    for w in (1, 2, 3):
        prefill_steps(model, w, 30000)  # 3 x 30000 over 2 workers would be ~45000 each: too slow
    assert model.decide([1, 2, 3], Traffic(1000, 100), Targets(500, 50), 80).delta == 0


def decode_steps(model: LoadModel, worker: int, batch: int, kv: int) -> None:
    for n, tokens in ((1, 1000), (4, 4000), (8, 16000), (16, 30000), (2, 5000), (32, 60000)):
        model.observe(
            StepSample(worker, 4 + 0.1 * n + 0.0005 * tokens, decode_requests=n, decode_kv_tokens=tokens)
        )
    model.observe(
        StepSample(worker, 4 + 0.1 * batch + 0.0005 * kv, decode_requests=batch, decode_kv_tokens=kv)
    )


def test_decode_decisions_from_the_itl_estimate() -> None:
    model = LoadModel(Pool.DECODE)
    decode_steps(model, 1, 32, 100000)
    decode_steps(model, 2, 32, 100000)
    up = model.decide([1, 2], Traffic(3000, 150), Targets(500, 50), 80)
    assert up.delta == +1 and up.itl_ms > 50
    model.forget([1, 2])
    decode_steps(model, 3, 1, 1000)
    decode_steps(model, 4, 1, 1000)
    assert model.decide([3, 4], Traffic(3000, 150), Targets(500, 50), 80).delta == -1


def test_decode_does_not_consolidate_past_the_kv_capacity() -> None:
    model = LoadModel(Pool.DECODE, limits=Limits(8192, 8000))
    decode_steps(model, 1, 1, 5000)
    decode_steps(model, 2, 1, 5000)
    assert model.decide([1, 2], Traffic(100, 10), Targets(500, 50), 80).delta == 0


def test_a_pool_without_samples_holds() -> None:
    model = LoadModel(Pool.AGGREGATED)
    decision = model.decide([], Traffic(100, 10), TARGETS, 80)
    assert decision.delta == 0 and "not ready" in decision.detail
