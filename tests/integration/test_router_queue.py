"""The router queue on real sockets: a router service, two real mocker workers, and this test as
the frontend (Route, then NotifyFirstToken to release a request's prefill load).

Every prompt is one block of its own (16 prefill tokens) and a rank is busy above 16 prefill
tokens in flight, so each worker takes two requests and the deployment four at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from tests.fixtures.worker import MODEL, running_worker
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.router.config import RouterSettings
from tokenyard.router.server import RouterServer
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = pytest.mark.integration

BS = 16
CAPACITY = 4
_hashes = itertools.count(1000)


async def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll until ``check`` holds; the timeout only guards against a hang."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


class Frontend:
    def __init__(self, server: RouterServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.stub = router_pb2_grpc.RouterServiceStub(channel)

    async def route(self, rid: str, priority: int = 0, timeout: float = 30.0) -> router_pb2.RouteResponse:
        request = router_pb2.RouteRequest(
            request_id=rid,
            model=MODEL,
            block_hashes=[next(_hashes)],
            isl_tokens=BS,
            hints=router_pb2.RouteHints(priority=priority),
        )
        return await self.stub.Route(request, timeout=timeout)

    def queue(self, rid: str, priority: int = 0, timeout: float = 30.0) -> asyncio.Task[Any]:
        return asyncio.create_task(self.route(rid, priority, timeout))

    async def first_token(self, rid: str) -> None:
        reply = await self.stub.NotifyFirstToken(
            router_pb2.NotifyFirstTokenRequest(request_id=rid), timeout=10
        )
        assert reply.applied

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.runtime.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    @property
    def waiting(self) -> float:
        return self.metric("tokenyard_router_queue_pending_requests")

    async def fill(self) -> list[str]:
        """Route CAPACITY requests: every worker is busy afterwards."""
        rids = [f"fill-{next(_hashes)}" for _ in range(CAPACITY)]
        for rid in rids:
            await self.route(rid)
        return rids


@contextlib.asynccontextmanager
async def deployment(**settings: Any) -> AsyncIterator[Frontend]:
    mocker = MockerConfig(block_size=BS, num_gpu_blocks=256, speedup_ratio=0)
    async with (
        running_worker(mocker) as w1,
        running_worker(mocker, discovery=w1.server.settings.discovery) as _w2,
    ):
        router_settings = RouterSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            discovery=w1.server.settings.discovery,
            grace_period=1.0,
            active_prefill_tokens_threshold=BS,
            **settings,
        )
        async with (
            RouterServer(router_settings) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            await eventually(lambda: len(server.router.workers) == 2, "both workers discovered")
            yield Frontend(server, channel)


async def test_a_burst_of_four_times_capacity_waits_and_none_is_refused() -> None:
    async with deployment(queue_max_size=64, queue_max_wait=30) as fe:
        rids = [f"b{i}" for i in range(4 * CAPACITY)]
        tasks = {asyncio.create_task(fe.route(rid)): rid for rid in rids}
        await eventually(lambda: fe.waiting == 3 * CAPACITY, "the burst beyond capacity queued")
        pending = set(tasks)
        served = 0
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a refusal would raise here
                served += 1
                await fe.first_token(tasks[task])  # its prefill is done: room for the next
        assert served == 4 * CAPACITY
        assert fe.waiting == 0
        assert fe.metric("tokenyard_router_queue_wait_seconds_count") == 3 * CAPACITY
        for reason in ("overloaded", "queue_full", "queue_timeout", "queue_deadline"):
            assert fe.metric("tokenyard_router_rejections_total", {"reason": reason}) == 0


async def test_higher_priority_is_served_first_then_arrival_order() -> None:
    async with deployment(queue_max_size=64, queue_max_wait=30) as fe:
        active = await fe.fill()
        order = [("low-1", 0), ("low-2", 0), ("high-1", 5), ("mid-1", 2), ("high-2", 5)]
        waiting: dict[str, asyncio.Task[Any]] = {}
        for n, (rid, priority) in enumerate(order, 1):
            waiting[rid] = fe.queue(rid, priority)
            await eventually(lambda n=n: fe.waiting == n, f"{rid} queued")  # type: ignore[misc]
        served: list[str] = []
        while waiting:
            # One request's first token frees room for exactly one more.
            await fe.first_token(active.pop(0))
            await eventually(lambda: any(t.done() for t in waiting.values()), "one routed")
            (rid,) = [rid for rid, t in waiting.items() if t.done()]
            waiting.pop(rid).result()
            served.append(rid)
            active.append(rid)
        assert served == ["high-1", "high-2", "mid-1", "low-1", "low-2"]


async def test_a_full_queue_and_a_long_wait_are_clear_refusals() -> None:
    async with deployment(queue_max_size=2, queue_max_wait=1.0) as fe:
        await fe.fill()
        first, second = fe.queue("q-1"), fe.queue("q-2")
        await eventually(lambda: fe.waiting == 2, "two queued")
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await fe.route("q-3")
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "router queue is full (2 waiting)" in (full.value.details() or "")
        for task in (first, second):
            with pytest.raises(grpc.aio.AioRpcError) as waited:
                await task
            assert waited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "stayed busy for" in (waited.value.details() or "")
            assert "longest wait" in (waited.value.details() or "")
        assert fe.metric("tokenyard_router_rejections_total", {"reason": "queue_full"}) == 1
        assert fe.metric("tokenyard_router_rejections_total", {"reason": "queue_timeout"}) == 2
        assert fe.waiting == 0


async def test_the_callers_deadline_bounds_the_wait() -> None:
    async with deployment(queue_max_size=8, queue_max_wait=30) as fe:
        await fe.fill()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await fe.route("d-1", timeout=1.0)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "waited" in (late.value.details() or "") and "up to its deadline" in (
            late.value.details() or ""
        )
        assert fe.metric("tokenyard_router_rejections_total", {"reason": "queue_deadline"}) == 1
        assert fe.waiting == 0


async def test_behind_a_backlog_bad_requests_are_refused_at_once() -> None:
    async with deployment(queue_max_size=8, queue_max_wait=30) as fe:
        await fe.fill()
        queued = fe.queue("w-1")
        await eventually(lambda: fe.waiting == 1, "one queued")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await fe.stub.Route(
                router_pb2.RouteRequest(request_id="x-1", model="nope", block_hashes=[1], isl_tokens=BS),
                timeout=5,
            )
        assert unknown.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await fe.stub.Route(
                router_pb2.RouteRequest(
                    request_id="x-2",
                    model=MODEL,
                    block_hashes=[1],
                    isl_tokens=BS,
                    hints=router_pb2.RouteHints(temperature=-1),
                ),
                timeout=5,
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fe.waiting == 1
        queued.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        await eventually(lambda: fe.waiting == 0, "the cancelled request left the queue")
