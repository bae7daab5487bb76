"""The planner's ticks with a fake connector and a fake observation source: one record per tick,
advisory mode, one action at a time, failures and bad input keep the last good decision."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tokenyard.api.planner.v1 import planner_pb2
from tokenyard.planner.connectors import ConnectorError
from tokenyard.planner.decide import Policy
from tokenyard.planner.load import StepSample
from tokenyard.planner.metrics import PlannerMetrics
from tokenyard.planner.observe import Observation, ObservationError
from tokenyard.planner.planner import Planner, PlannerConfig
from tokenyard.planner.pools import Mode, Pool
from tokenyard.planner.records import Reason, State
from tokenyard.planner.servicer import PlannerServicer
from tokenyard.planner.throughput import Targets

pytestmark = pytest.mark.unit

AGG = Pool.AGGREGATED


class Linear:
    max_kv_tokens = 100_000
    max_num_seqs = 64
    max_num_batched_tokens = 8192

    def prefill_ms(self, tokens: float) -> float:
        return 10 + 0.01 * tokens

    def itl_ms(self, concurrency: float, context: float) -> float:
        return 5 + 0.001 * max(1.0, concurrency) * context


class FakeConnector:
    def __init__(self, replicas: int = 1) -> None:
        self.replicas = {AGG: replicas}
        self.calls: list[tuple[dict[Pool, int], int]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.read_fails = False
        self.closed = False

    def name(self) -> str:
        return "fake"

    async def current_replicas(self) -> dict[Pool, int]:
        if self.read_fails:
            raise ConnectorError("the API server is down")
        return dict(self.replicas)

    async def scale(self, target: dict[Pool, int], decision_id: int) -> None:
        self.calls.append((dict(target), decision_id))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.replicas.update(target)

    async def close(self) -> None:
        self.closed = True


class FakeSource:
    def __init__(self, items: Iterable[Observation | Exception]) -> None:
        self.items = list(items)

    async def observe(self) -> Observation:
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def traffic(rate: float, interval: float = 10.0) -> Observation:
    return Observation(interval, rate * interval, isl=3000, osl=150, kv_hit_rate=0.0, ttft_ms=100, itl_ms=20)


FIRST = Observation(10.0, math.nan)


def planner(
    source: list[Observation | Exception], connector: FakeConnector | None = None, **config: Any
) -> tuple[Planner, FakeConnector, CollectorRegistry]:
    policy = Policy(Mode.AGGREGATED, Targets(500, 50), {AGG: 1}, load_enabled=config.pop("load", False))
    cfg = PlannerConfig(policy, predictor="constant", **config)
    conn = connector or FakeConnector()
    registry = CollectorRegistry()
    p = Planner(cfg, conn, FakeSource(source), perf_model=Linear(), metrics=PlannerMetrics(registry))
    return p, conn, registry


async def test_one_record_per_tick_and_the_action_is_applied() -> None:
    p, conn, registry = planner([FIRST, traffic(10)])
    first = await p.throughput_tick()
    assert first.decision_id == 1 and first.pools[0].state is State.UNCHANGED
    second = await p.throughput_tick()
    assert second.decision_id == 2 and second.pools[0].desired == 6  # 10 req/s at 1.80 req/s per worker
    states = [second.pools[0].state]
    await p.wait_for_action()
    states.append(second.pools[0].state)
    assert states == [State.PENDING, State.APPLIED] and conn.calls == [({AGG: 6}, 2)]
    assert [r.decision_id for r in p.records] == [1, 2]
    assert (
        registry.get_sample_value("tokenyard_planner_replicas", {"pool": "aggregated", "kind": "desired"})
        == 6
    )
    assert registry.get_sample_value("tokenyard_planner_decision_id") == 2
    assert "aggregated=1->6(throughput,applied)" in second.log_line()


async def test_advisory_mode_never_scales() -> None:
    p, conn, _ = planner([FIRST, traffic(10)], advisory=True)
    await p.throughput_tick()
    record = await p.throughput_tick()
    assert record.pools[0].state is State.ADVISORY and record.pools[0].desired == 6
    assert conn.calls == []


async def test_no_new_action_while_one_is_in_progress() -> None:
    conn = FakeConnector()
    conn.gate = asyncio.Event()
    p, _, _ = planner([FIRST, traffic(10), traffic(20)], conn)
    await p.throughput_tick()
    await p.throughput_tick()
    assert p.action_in_progress
    deferred = await p.throughput_tick()
    assert deferred.pools[0].state is State.DEFERRED
    assert "decision 2 is still being applied" in deferred.summary
    assert len(conn.calls) == 1
    conn.gate.set()
    await p.wait_for_action()
    assert not p.action_in_progress


async def test_a_failing_connector_is_recorded_and_reported_on_the_next_tick() -> None:
    conn = FakeConnector()
    conn.fail = ConnectorError("deployment tokenyard/tokenyard-worker not found")
    p, _, registry = planner([FIRST, traffic(10), traffic(10)], conn)
    await p.throughput_tick()
    failed = await p.throughput_tick()
    await p.wait_for_action()
    assert failed.pools[0].state is State.FAILED and "not found" in failed.summary
    nxt = await p.throughput_tick()
    assert "last action failed: decision 2: deployment tokenyard/tokenyard-worker not found" in nxt.summary
    assert (
        registry.get_sample_value(
            "tokenyard_planner_actions_total", {"connector": "fake", "outcome": "failed"}
        )
        == 1
    )


async def test_a_connector_that_times_out() -> None:
    conn = FakeConnector()
    conn.gate = asyncio.Event()  # never set
    p, _, _ = planner([FIRST, traffic(10)], conn, action_timeout_s=0.05)
    await p.throughput_tick()
    record = await p.throughput_tick()
    await p.wait_for_action()
    assert record.pools[0].state is State.FAILED
    assert "fake connector did not finish within 0.05s" in record.summary


async def test_unreadable_frontends_keep_the_last_good_decision() -> None:
    p, conn, _ = planner([FIRST, traffic(10), ObservationError("cannot scrape http://f/metrics: refused")])
    await p.throughput_tick()
    good = await p.throughput_tick()
    await p.wait_for_action()
    kept = await p.throughput_tick()
    assert kept.pools[0].reason is Reason.LAST_GOOD and kept.pools[0].desired == good.pools[0].desired
    assert "frontend metrics unusable: cannot scrape" in kept.summary
    assert f"keeping decision {good.decision_id}" in kept.summary
    assert len(conn.calls) == 1


async def test_unreadable_replicas_keep_the_last_good_decision() -> None:
    conn = FakeConnector()
    p, _, _ = planner([FIRST], conn)
    await p.throughput_tick()
    conn.read_fails = True
    record = await p.throughput_tick()
    assert record.pools[0].reason is Reason.LAST_GOOD
    assert "cannot read replicas: the API server is down" in record.summary


async def test_without_a_model_the_planner_holds_and_says_why() -> None:
    policy = Policy(Mode.AGGREGATED, Targets(500, 50), {AGG: 1}, load_enabled=False)
    p = Planner(
        PlannerConfig(policy, predictor="constant"), FakeConnector(3), FakeSource([FIRST, traffic(10)])
    )
    await p.throughput_tick()
    record = await p.throughput_tick()
    assert record.pools[0].desired == 3 and record.pools[0].reason is Reason.HOLD
    assert "perf model not ready" in record.summary and "no observations yet" in record.summary


async def test_load_tick_from_step_samples() -> None:
    conn = FakeConnector(2)
    p, _, _ = planner([], conn, load=True)
    for worker in (1, 2):
        for tokens, kv in (
            (256, 1000),
            (1024, 4000),
            (4096, 8000),
            (512, 2000),
            (2048, 16000),
            (8192, 30000),
        ):
            p.observe_step(
                AGG,
                StepSample(
                    worker,
                    5 + 0.01 * tokens + 0.0005 * kv,
                    prefill_tokens=tokens,
                    decode_kv_tokens=kv,
                    queued_prefill_tokens=80000,
                ),
            )
    record = await p.load_tick()
    assert record.pools[0].desired == 3 and record.pools[0].reason is Reason.LOAD
    assert "every worker over target" in record.summary
    p.forget_worker(AGG, 1)
    assert list(p.load_models[AGG].workers) == [2]


async def test_the_servicer_translates_records() -> None:
    p, _, _ = planner([FIRST, traffic(10)], advisory=True)
    await p.throughput_tick()
    await p.throughput_tick()
    servicer = PlannerServicer(p)
    status = await servicer.GetStatus(planner_pb2.GetStatusRequest(), None)  # type: ignore[arg-type]
    assert status.mode == planner_pb2.PLANNER_MODE_AGGREGATED and status.advisory
    assert status.connector == "fake" and status.predictor == "constant" and status.perf_model_ready
    assert status.observed.request_rate_per_s == 10 and status.target_ttft_ms == 500
    assert status.last_record.decision_id == 2
    assert status.decisions[0].desired_replicas == 6
    assert status.decisions[0].state == planner_pb2.DECISION_STATE_ADVISORY
    decision = await servicer.GetDecision(planner_pb2.GetDecisionRequest(component="aggregated"), None)  # type: ignore[arg-type]
    assert decision.decisions[0].reason == planner_pb2.DECISION_REASON_THROUGHPUT
    assert decision.decisions[0].throughput_replicas == 6
    listed = await servicer.ListDecisions(planner_pb2.ListDecisionsRequest(limit=1), None)  # type: ignore[arg-type]
    assert [r.decision_id for r in listed.records] == [2]
    assert listed.records[0].kind == planner_pb2.TICK_KIND_THROUGHPUT
    assert (
        math.isnan(listed.records[0].pools[0].estimated_itl_ms)
        or listed.records[0].pools[0].estimated_itl_ms > 0
    )


async def test_close_cancels_the_action_and_closes_the_connector() -> None:
    conn = FakeConnector()
    conn.gate = asyncio.Event()
    p, _, _ = planner([FIRST, traffic(10)], conn)
    await p.throughput_tick()
    await p.throughput_tick()
    await p.close()
    assert conn.closed and not p.action_in_progress
