"""PlannerService: proto in → planner domain → proto out."""

from __future__ import annotations

import time
from typing import Any

import grpc

from tokenyard.planner.replicas import Decision, ReplicaObserver
from tokenyard.planner.v1 import planner_pb2, planner_pb2_grpc

SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name


def _decision(d: Decision) -> planner_pb2.ReplicaDecision:
    return planner_pb2.ReplicaDecision(
        component=d.component,
        decision_id=d.decision_id,
        current_replicas=d.current_replicas,
        desired_replicas=d.desired_replicas,
        reason=planner_pb2.DECISION_REASON_HOLD,
        state=planner_pb2.DECISION_STATE_ADVISORY,
        decided_at_unix_ns=d.decided_at_ns,
        detail=d.detail,
    )


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, observer: ReplicaObserver) -> None:
        self._observer = observer

    async def GetDecision(
        self, request: planner_pb2.GetDecisionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> planner_pb2.GetDecisionResponse:
        return planner_pb2.GetDecisionResponse(
            decisions=[_decision(d) for d in self._observer.decisions(request.component)]
        )

    async def GetStatus(
        self, request: planner_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> planner_pb2.GetStatusResponse:
        return planner_pb2.GetStatusResponse(
            mode=planner_pb2.PLANNER_MODE_AGGREGATED,
            connector="none",
            advisory=True,
            perf_model_ready=False,
            last_tick_unix_ns=time.time_ns(),
            decisions=[_decision(d) for d in self._observer.decisions()],
        )
