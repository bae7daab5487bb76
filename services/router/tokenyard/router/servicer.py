"""RouterService: proto in → routing domain → proto out, nothing else."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tokenyard.common.errors import InvalidArgument, Unavailable, Unimplemented
from tokenyard.router.active import ActiveRequest, ActiveRequests, Outcome
from tokenyard.router.policy import RoutingPolicy, make_policy
from tokenyard.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.router.workers import WorkerSet

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name

_MODE_NAMES = {
    router_pb2.ROUTING_MODE_ROUND_ROBIN: "round-robin",
    router_pb2.ROUTING_MODE_RANDOM: "random",
}
_MODE_ENUMS = {name: value for value, name in _MODE_NAMES.items()}
_OUTCOMES = {
    router_pb2.REQUEST_OUTCOME_FINISHED: Outcome.FINISHED,
    router_pb2.REQUEST_OUTCOME_FAILED: Outcome.FAILED,
    router_pb2.REQUEST_OUTCOME_CANCELLED: Outcome.CANCELLED,
}


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, workers: WorkerSet, active: ActiveRequests, default_mode: str) -> None:
        self._workers = workers
        self._active = active
        self._default = make_policy(default_mode)
        self._policies: dict[str, RoutingPolicy] = {default_mode: self._default}

    def _policy(self, mode: router_pb2.RoutingMode.ValueType) -> RoutingPolicy:
        if mode == router_pb2.ROUTING_MODE_UNSPECIFIED:
            return self._default
        name = _MODE_NAMES.get(mode)
        if name is None:
            raise Unimplemented(
                f"routing mode {router_pb2.RoutingMode.Name(mode)} is not available in this router"
            )
        if name not in self._policies:
            self._policies[name] = make_policy(name)
        return self._policies[name]

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.RouteResponse:
        if not request.model:
            raise InvalidArgument("model must be set")
        if not request.request_id:
            raise InvalidArgument("request_id must be set")
        candidates = self._workers.for_model(request.model)
        hints = request.hints
        if hints.allowed_worker_ids:
            allowed = set(hints.allowed_worker_ids)
            candidates = [w for w in candidates if w.instance_id in allowed]
        if hints.HasField("pinned_worker_id"):
            candidates = [w for w in candidates if w.instance_id == hints.pinned_worker_id]
        if not candidates:
            raise Unavailable(f"no worker serves model {request.model!r}")
        policy = self._policy(hints.mode)
        chosen = policy.select(candidates, self._active)
        dp_rank = hints.dp_rank if hints.HasField("dp_rank") else 0
        if not request.dry_run:
            self._active.add(
                ActiveRequest(request.request_id, chosen.instance_id, dp_rank, request.isl_tokens, 0)
            )
        card = chosen.model_card
        return router_pb2.RouteResponse(
            worker_id=chosen.instance_id,
            dp_rank=dp_rank,
            address=chosen.address,
            block_size=card.block_size if card else 0,
            mode=_MODE_ENUMS[policy.name()],
        )

    async def NotifyFirstToken(
        self, request: router_pb2.NotifyFirstTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.NotifyFirstTokenResponse:
        return router_pb2.NotifyFirstTokenResponse(applied=self._active.first_token(request.request_id))

    async def NotifyFinished(
        self, request: router_pb2.NotifyFinishedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.NotifyFinishedResponse:
        outcome = _OUTCOMES.get(request.outcome)
        if outcome is None:
            raise InvalidArgument("outcome must be FINISHED, FAILED or CANCELLED")
        return router_pb2.NotifyFinishedResponse(applied=self._active.finish(request.request_id, outcome))

    async def Dump(
        self, request: router_pb2.DumpRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[router_pb2.DumpResponse]:
        raise Unimplemented("this router keeps no KV index yet (modes round-robin and random)")
        yield router_pb2.DumpResponse()  # pragma: no cover - makes this an async generator

    async def QueryOverlap(
        self, request: router_pb2.QueryOverlapRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.QueryOverlapResponse:
        raise Unimplemented("this router keeps no KV index yet (modes round-robin and random)")

    async def SubscribeReplicaEvents(
        self, request: router_pb2.SubscribeReplicaEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[router_pb2.SubscribeReplicaEventsResponse]:
        raise Unimplemented("replica sync is not available in this router yet")
        yield router_pb2.SubscribeReplicaEventsResponse()  # pragma: no cover
