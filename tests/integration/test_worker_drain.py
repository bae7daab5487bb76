"""Drain: intake stops, the instance leaves discovery, in-flight requests finish (or are cancelled
once the grace period is over)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.worker import RunningWorker, eventually, generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = pytest.mark.integration

# Real time: a decode step takes a few milliseconds, so long requests stay in flight.
REAL_TIME = MockerConfig(speedup_ratio=1, block_size=4, num_gpu_blocks=2048)

GenerateCall = grpc.aio.UnaryStreamCall[worker_pb2.GenerateRequest, worker_pb2.GenerateResponse]


async def started(w: RunningWorker, request: worker_pb2.GenerateRequest) -> tuple[GenerateCall, list[int]]:
    """A Generate call that has produced its first tokens."""
    call = w.stub.Generate(request)
    first = await call.read()
    assert isinstance(first, worker_pb2.GenerateResponse) and first.token_ids
    return call, list(first.token_ids)


async def rest_of(call: GenerateCall) -> list[worker_pb2.GenerateResponse]:
    responses = []
    while isinstance(response := await call.read(), worker_pb2.GenerateResponse):
        responses.append(response)
    return responses


async def test_drain_stops_intake_leaves_discovery_and_lets_in_flight_requests_finish() -> None:
    async with running_worker(REAL_TIME) as w:
        assert len(await w.discovery.instances("worker")) == 1
        call, tokens = await started(w, generate_request("inflight", range(20), 200))

        drained = await w.stub.Drain(worker_pb2.DrainRequest(), timeout=10)
        assert (drained.in_flight_requests, drained.already_draining) == (1, False)
        assert await w.discovery.instances("worker") == []

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await w.generate(generate_request("late", range(20), 5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (refused.value.details() or "")

        described = await w.stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
        assert described.draining
        health = health_pb2_grpc.HealthStub(w.channel)

        async def not_serving() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            return bool(reply.status == health_pb2.HealthCheckResponse.NOT_SERVING)

        await eventually(not_serving, "health reports NOT_SERVING while draining")

        responses = await rest_of(call)
        tokens += [t for r in responses for t in r.token_ids]
        assert len(tokens) == 200
        assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH

        again = await w.stub.Drain(worker_pb2.DrainRequest(wait=True), timeout=10)
        assert (again.in_flight_requests, again.cancelled_requests, again.already_draining) == (1, 0, True)
        # The process keeps answering until it is told to stop.
        load = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
        assert load.ranks[0].active_blocks == 0 and load.ranks[0].running_requests == 0


async def test_requests_still_running_after_the_grace_period_end_cancelled() -> None:
    async with running_worker(REAL_TIME) as w:
        call, _ = await started(w, generate_request("endless", range(20)))  # up to the context: minutes

        drained = await w.stub.Drain(worker_pb2.DrainRequest(grace_period_ms=100, wait=True), timeout=30)
        assert (drained.in_flight_requests, drained.cancelled_requests) == (1, 1)

        last = (await rest_of(call))[-1]
        assert last.finish_reason == worker_pb2.FINISH_REASON_CANCELLED
        assert last.usage.prompt_tokens == 20 and last.usage.completion_tokens > 0
        assert await w.active_blocks() == 0


async def test_draining_an_idle_worker_answers_at_once() -> None:
    async with running_worker(REAL_TIME) as w:
        drained = await w.stub.Drain(worker_pb2.DrainRequest(wait=True), timeout=10)
        assert (drained.in_flight_requests, drained.cancelled_requests, drained.already_draining) == (
            0,
            0,
            False,
        )
        assert await w.discovery.instances("worker") == []
