"""PlannerService: proto in → planner domain → proto out."""

from __future__ import annotations

from typing import Any

import grpc

from tokenyard.api.planner.v1 import planner_pb2, planner_pb2_grpc
from tokenyard.planner.planner import Planner
from tokenyard.planner.pools import Mode
from tokenyard.planner.records import DecisionRecord, PoolDecision, Reason, State, TickKind, TrafficStats

SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name

_REASONS = {
    Reason.THROUGHPUT: planner_pb2.DECISION_REASON_THROUGHPUT,
    Reason.LOAD: planner_pb2.DECISION_REASON_LOAD,
    Reason.HOLD: planner_pb2.DECISION_REASON_HOLD,
    Reason.MIN_REPLICAS: planner_pb2.DECISION_REASON_MIN_REPLICAS,
    Reason.GPU_BUDGET: planner_pb2.DECISION_REASON_GPU_BUDGET,
    Reason.MAX_CHANGE: planner_pb2.DECISION_REASON_MAX_CHANGE,
    Reason.LAST_GOOD: planner_pb2.DECISION_REASON_LAST_GOOD,
}
_STATES = {
    State.PENDING: planner_pb2.DECISION_STATE_PENDING,
    State.APPLIED: planner_pb2.DECISION_STATE_APPLIED,
    State.FAILED: planner_pb2.DECISION_STATE_FAILED,
    State.ADVISORY: planner_pb2.DECISION_STATE_ADVISORY,
    State.UNCHANGED: planner_pb2.DECISION_STATE_UNCHANGED,
    State.DEFERRED: planner_pb2.DECISION_STATE_DEFERRED,
}
_MODES = {
    Mode.AGGREGATED: planner_pb2.PLANNER_MODE_AGGREGATED,
    Mode.DISAGGREGATED: planner_pb2.PLANNER_MODE_DISAGGREGATED,
    Mode.PREFILL: planner_pb2.PLANNER_MODE_PREFILL,
    Mode.DECODE: planner_pb2.PLANNER_MODE_DECODE,
}
_KINDS = {TickKind.THROUGHPUT: planner_pb2.TICK_KIND_THROUGHPUT, TickKind.LOAD: planner_pb2.TICK_KIND_LOAD}

Context = grpc.aio.ServicerContext[Any, Any]


def _pool(d: PoolDecision, record: DecisionRecord) -> planner_pb2.ReplicaDecision:
    return planner_pb2.ReplicaDecision(
        component=d.pool.value,
        decision_id=record.decision_id,
        current_replicas=d.current,
        desired_replicas=d.desired,
        reason=_REASONS[d.reason],
        state=_STATES[d.state],
        decided_at_unix_ns=record.decided_at_ns,
        detail=d.detail,
        throughput_replicas=d.throughput_replicas,
        estimated_ttft_ms=d.ttft_ms,
        estimated_itl_ms=d.itl_ms,
    )


def _traffic(t: TrafficStats) -> planner_pb2.TrafficStats:
    return planner_pb2.TrafficStats(
        request_rate_per_s=t.request_rate,
        avg_isl_tokens=t.isl,
        avg_osl_tokens=t.osl,
        kv_hit_rate=t.kv_hit_rate,
    )


def _record(r: DecisionRecord) -> planner_pb2.DecisionRecord:
    return planner_pb2.DecisionRecord(
        decision_id=r.decision_id,
        decided_at_unix_ns=r.decided_at_ns,
        kind=_KINDS[r.kind],
        observed=_traffic(r.observed),
        predicted=_traffic(r.predicted),
        observed_ttft_ms=r.observed_ttft_ms,
        observed_itl_ms=r.observed_itl_ms,
        pools=[_pool(p, r) for p in r.pools],
        summary=r.summary,
        gpus=r.gpus,
    )


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, planner: Planner) -> None:
        self._planner = planner

    def _latest(self, component: str = "") -> list[planner_pb2.ReplicaDecision]:
        out: list[planner_pb2.ReplicaDecision] = []
        for record in reversed(self._planner.records):
            for p in record.pools:
                if (not component or p.pool.value == component) and p.pool.value not in {
                    d.component for d in out
                }:
                    out.append(_pool(p, record))
            if len(out) == len(self._planner.policy.mode.pools):
                break
        return sorted(out, key=lambda d: d.component)

    async def GetDecision(
        self, request: planner_pb2.GetDecisionRequest, context: Context
    ) -> planner_pb2.GetDecisionResponse:
        return planner_pb2.GetDecisionResponse(decisions=self._latest(request.component))

    async def GetStatus(
        self, request: planner_pb2.GetStatusRequest, context: Context
    ) -> planner_pb2.GetStatusResponse:
        p = self._planner
        last = p.records[-1] if p.records else None
        obs = p.last_observation
        response = planner_pb2.GetStatusResponse(
            mode=_MODES[p.policy.mode],
            connector=p.connector.name(),
            advisory=p.config.advisory,
            observed=_traffic(
                TrafficStats(obs.request_rate, obs.isl, obs.osl, obs.kv_hit_rate) if obs else TrafficStats()
            ),
            predicted=_traffic(p.last_prediction),
            observed_ttft_ms=obs.ttft_ms if obs else float("nan"),
            observed_itl_ms=obs.itl_ms if obs else float("nan"),
            target_ttft_ms=p.policy.targets.ttft_ms,
            target_itl_ms=p.policy.targets.itl_ms,
            max_gpu_budget=p.policy.budget.max_gpus,
            perf_model_ready=p.perf_model_ready(),
            last_tick_unix_ns=last.decided_at_ns if last else 0,
            decisions=self._latest(),
            predictor=p.config.predictor,
            action_in_progress=p.action_in_progress,
        )
        if last is not None:
            response.last_record.CopyFrom(_record(last))
        return response

    async def ListDecisions(
        self, request: planner_pb2.ListDecisionsRequest, context: Context
    ) -> planner_pb2.ListDecisionsResponse:
        records = list(self._planner.records)
        if request.limit:
            records = records[-request.limit :]
        return planner_pb2.ListDecisionsResponse(records=[_record(r) for r in records])
