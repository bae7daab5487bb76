"""The router in-process with a real mocker worker: a Route that claims more than the model card
allows is refused and recorded nowhere, and the requests of a client whose notification stream
broke for good stop counting as load."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
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
CONTEXT = 1024
MOCKER = MockerConfig(block_size=BS, num_gpu_blocks=256, speedup_ratio=0, max_model_len=CONTEXT)
RELEASE_AFTER = 0.5


async def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


@dataclass
class Stack:
    server: RouterServer

    @property
    def active(self) -> int:
        return len(self.server.router.active)

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.server.address)


@contextlib.asynccontextmanager
async def stack() -> AsyncIterator[Stack]:
    async with running_worker(MOCKER) as worker:
        settings = RouterSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            discovery=worker.server.settings.discovery,
            grace_period=1.0,
            client_release_after=RELEASE_AFTER,
        )
        async with RouterServer(settings) as server:
            s = Stack(server)
            await eventually(lambda: len(server.router.workers) == 1, "the worker is seen")
            yield s


def route(rid: str, blocks: int, isl: int, **kw: Any) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(
        request_id=rid, model=MODEL, block_hashes=list(range(1, blocks + 1)), isl_tokens=isl, **kw
    )


async def _refused(stub: router_pb2_grpc.RouterServiceAsyncStub, request: router_pb2.RouteRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Route(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    return err.value.details() or ""


async def test_a_route_beyond_the_model_card_is_refused_and_recorded_nowhere() -> None:
    async with stack() as s, s.channel() as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        assert "isl_tokens" in await _refused(stub, route("huge-isl", 0, 2**32 - 1))
        assert "block_hashes" in await _refused(stub, route("many-blocks", 1_000_000, 0))
        assert "block_hashes" in await _refused(stub, route("one-too-many", CONTEXT // BS + 1, 0))
        assert "do not fit" in await _refused(stub, route("blocks-past-isl", 10, 20))
        hints = router_pb2.RouteHints(expected_output_tokens=10 * CONTEXT)
        assert "expected_output_tokens" in await _refused(stub, route("long-output", 1, BS, hints=hints))
        assert "request_id" in await _refused(stub, route("x" * 5000, 1, BS))
        long_session = router_pb2.RouteHints(session_id="s" * 5000)
        assert "session_id" in await _refused(stub, route("long-session", 1, BS, hints=long_session))
        assert s.active == 0
        # The largest prompt the card allows is routed and counted.
        reply = await stub.Route(route("fits", CONTEXT // BS, CONTEXT), timeout=10)
        assert reply.block_size == BS and s.active == 1
        # What a refused claim would have added is absent: the next decision sees only "fits".
        probe = await stub.Route(route("probe", 1, BS, dry_run=True), timeout=10)
        assert probe.active_prefill_tokens == CONTEXT


async def _route_three(stub: router_pb2_grpc.RouterServiceAsyncStub, prefix: str) -> list[str]:
    ids = [f"{prefix}-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    for rid in ids:
        await stub.Route(route(rid, 4, 4 * BS), timeout=10)
    return ids


async def _open_stream(
    stub: router_pb2_grpc.RouterServiceAsyncStub, first_token: str
) -> grpc.aio.StreamStreamCall[Any, Any]:
    """A notification stream with one first token sent and acknowledged."""
    call: Any = stub.StreamNotifications()  # type: ignore[call-arg]
    note = router_pb2.LifecycleNotification(
        first_token=router_pb2.NotifyFirstTokenRequest(request_id=first_token)
    )
    await call.write(router_pb2.StreamNotificationsRequest(notifications=[note]))
    ack = await call.read()
    assert ack.handled == 1
    return call  # type: ignore[no-any-return]


async def test_a_client_whose_stream_breaks_for_good_has_its_requests_released() -> None:
    async with stack() as s:
        channel = s.channel()
        stub = router_pb2_grpc.RouterServiceStub(channel)
        ids = await _route_three(stub, "crashed")
        await _open_stream(stub, ids[0])
        assert s.active == 3
        # The client vanishes: its connection closes with the stream open (a crash, a kill -9).
        await channel.close(None)
        await eventually(lambda: s.active == 0, "the vanished client's requests were released")
        assert s.server.router.servicer.leases.released == 3


async def test_a_live_client_whose_stream_broke_keeps_its_requests() -> None:
    async with stack() as s, s.channel() as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        live = await _route_three(stub, "live")
        broken = await _open_stream(stub, live[0])
        broken.cancel()
        leases = s.server.router.servicer.leases
        await eventually(lambda: leases.open_streams() == 0, "the router saw the stream end")
        # Still there: a unary notification puts the release off, and a new stream calls it off.
        await stub.NotifyFirstToken(router_pb2.NotifyFirstTokenRequest(request_id=live[1]), timeout=10)
        await _open_stream(stub, live[2])
        await asyncio.sleep(RELEASE_AFTER * 4)
        assert s.active == 3 and leases.released == 0
        for rid in live:
            finished = router_pb2.NotifyFinishedRequest(
                request_id=rid, outcome=router_pb2.REQUEST_OUTCOME_FINISHED
            )
            assert (await stub.NotifyFinished(finished, timeout=10)).applied
        assert s.active == 0


async def test_a_client_is_known_by_its_identity_across_connections() -> None:
    identity = (("tokenyard-client", uuid.uuid4().hex),)
    async with stack() as s:
        first = s.channel()
        stub = router_pb2_grpc.RouterServiceStub(first)
        rid = f"moved-{uuid.uuid4().hex[:6]}"
        await stub.Route(route(rid, 4, 4 * BS), timeout=10, metadata=identity)
        call: Any = stub.StreamNotifications(metadata=identity)  # type: ignore[call-arg]
        note = router_pb2.LifecycleNotification(
            first_token=router_pb2.NotifyFirstTokenRequest(request_id=rid)
        )
        await call.write(router_pb2.StreamNotificationsRequest(notifications=[note]))
        assert (await call.read()).handled == 1
        await first.close(None)
        leases = s.server.router.servicer.leases
        await eventually(lambda: leases.open_streams() == 0, "the router saw the stream end")
        # The same client on a new connection (a reconnect) is the same client: its new stream
        # calls the release off.
        async with s.channel() as second:
            again = router_pb2_grpc.RouterServiceStub(second)
            reopened: Any = again.StreamNotifications(metadata=identity)  # type: ignore[call-arg]
            await eventually(lambda: leases.open_streams() == 1, "the router saw the new stream")
            await asyncio.sleep(RELEASE_AFTER * 4)
            assert s.active == 1 and leases.released == 0
            reopened.cancel()
