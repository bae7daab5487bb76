"""The frontend's router client against real routers and scripted ones, on real sockets: lifecycle
notifications ride one stream per router, and what a broken stream left unacknowledged reaches a
router through the unary calls, exactly where failover says.

Scripted routers are real gRPC servers whose answers (and acknowledgements) the test decides, so that
a stream breaks exactly when the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
import pytest

from tests.fixtures.worker import MODEL
from tests.integration.test_router_service import RouterClient as RouterProbe
from tests.integration.test_router_service import eventually, running_router, scripted_worker
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.common.errors import Unavailable
from tokenyard.frontend.clients import RouterClient
from tokenyard.frontend.generation import Outcome

pytestmark = pytest.mark.integration


class ScriptedRouter(router_pb2_grpc.RouterServiceServicer):
    """Routes everything to one made-up worker; records every notification it receives. Its
    notification stream acknowledges at most ``ack_limit`` notifications and fails with UNAVAILABLE
    once ``fail`` is set; ``streams`` False answers it as a router that predates it."""

    def __init__(self, *, streams: bool = True) -> None:
        self.streams = streams
        self.ack_limit = 1_000_000
        self.streamed: list[tuple[str, str]] = []
        self.unary: list[tuple[str, str]] = []
        self.fail = asyncio.Event()

    async def Route(self, request: router_pb2.RouteRequest, context: Any) -> router_pb2.RouteResponse:
        return router_pb2.RouteResponse(worker_id=7, address="127.0.0.1:9")

    async def NotifyFirstToken(
        self, request: router_pb2.NotifyFirstTokenRequest, context: Any
    ) -> router_pb2.NotifyFirstTokenResponse:
        self.unary.append(("first_token", request.request_id))
        return router_pb2.NotifyFirstTokenResponse(applied=True)

    async def NotifyFinished(
        self, request: router_pb2.NotifyFinishedRequest, context: Any
    ) -> router_pb2.NotifyFinishedResponse:
        self.unary.append(("finished", request.request_id))
        return router_pb2.NotifyFinishedResponse(applied=True)

    async def StreamNotifications(
        self, request_iterator: AsyncIterable[router_pb2.StreamNotificationsRequest], context: Any
    ) -> AsyncIterator[router_pb2.StreamNotificationsResponse]:
        if not self.streams:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        received = asyncio.Event()

        async def read() -> None:
            async for request in request_iterator:
                for note in request.notifications:
                    kind = note.WhichOneof("notification")
                    assert kind is not None
                    self.streamed.append((kind, getattr(note, kind).request_id))
                received.set()

        reader = asyncio.create_task(read())
        try:
            acked = 0
            while not self.fail.is_set():
                await asyncio.wait(
                    [asyncio.create_task(received.wait()), asyncio.create_task(self.fail.wait())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                received.clear()
                if min(len(self.streamed), self.ack_limit) > acked and not self.fail.is_set():
                    acked = min(len(self.streamed), self.ack_limit)
                    yield router_pb2.StreamNotificationsResponse(handled=acked)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        finally:
            reader.cancel()


@contextlib.asynccontextmanager
async def scripted_router(servicer: ScriptedRouter) -> AsyncIterator[str]:
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def unary_calls(r: RouterProbe, method: str) -> float:
    return r.metric(
        "tokenyard_rpc_requests_total",
        {"service": "router", "method": f"/tokenyard.api.router.v1.RouterService/{method}", "code": "OK"},
    )


@pytest.fixture
def discovery_url() -> str:
    return f"memory://router-client-test-{uuid.uuid4().hex}"


async def test_notifications_ride_one_stream_and_free_every_request(discovery_url: str) -> None:
    async with running_router(discovery_url) as r, scripted_worker(discovery_url) as (w, inst):
        await w.next_subscription(1)
        client = RouterClient([r.server.address])
        try:
            ids = [f"req-{i}" for i in range(20)]
            for rid in ids:
                await client.route(request_id=rid, model=MODEL, block_hashes=[1, 2], isl_tokens=2 * 16)
            assert r.router.active.load(inst.instance_id).active_requests == 20
            for rid in ids[:10]:
                client.notify_first_token(rid)
            for rid in ids:
                client.notify_finished(rid, Outcome.FINISHED, 4)
            await client.flush()
            assert len(r.router.active) == 0
            assert r.metric("tokenyard_router_time_to_first_token_seconds_count") == 10
        finally:
            await client.close()
        # One call carried them all, and closing ended it cleanly.
        assert unary_calls(r, "StreamNotifications") == 1
        assert unary_calls(r, "NotifyFinished") == unary_calls(r, "NotifyFirstToken") == 0


async def test_what_a_broken_stream_left_unacknowledged_fails_over_to_another_router(
    discovery_url: str,
) -> None:
    flaky = ScriptedRouter()  # type: ignore[abstract]  # serves only what the client calls
    async with (
        scripted_router(flaky) as flaky_address,
        running_router(discovery_url) as r,
        scripted_worker(discovery_url) as (w, _inst),
    ):
        await w.next_subscription(1)
        client = RouterClient([flaky_address, r.server.address])
        try:
            # The first route goes to the first router; the other one knows the request too, as
            # replica sync would have told it.
            decision = await client.route(request_id="x", model=MODEL, block_hashes=[1], isl_tokens=16)
            assert decision.worker_id == 7, "routed by the scripted router"
            await r.route([1], rid="x")
            flaky.ack_limit = 1
            client.notify_first_token("x")
            client.notify_finished("x", Outcome.FINISHED, 4)
            await eventually(lambda: len(flaky.streamed) == 2, "both notifications streamed")
            flaky.fail.set()
            await eventually(lambda: len(r.router.active) == 0, "the finish reached the other router")
            await client.flush()
        finally:
            await client.close()
        assert flaky.streamed == [("first_token", "x"), ("finished", "x")]
        # Only the unacknowledged finish was sent again, to the router still up.
        assert flaky.unary == []
        assert unary_calls(r, "NotifyFinished") == 1
        assert unary_calls(r, "NotifyFirstToken") == 0


async def test_a_router_without_the_stream_gets_unary_notifications() -> None:
    old = ScriptedRouter(streams=False)  # type: ignore[abstract]  # serves only what the client calls
    async with scripted_router(old) as address:
        client = RouterClient([address])
        try:
            await client.route(request_id="y", model=MODEL, block_hashes=[1], isl_tokens=16)
            client.notify_first_token("y")
            client.notify_finished("y", Outcome.CANCELLED, 0)
            await client.flush()
            await client.route(request_id="z", model=MODEL, block_hashes=[1], isl_tokens=16)
            client.notify_finished("z", Outcome.FINISHED, 1)
            await client.flush()
        finally:
            await client.close()
        assert old.unary == [("first_token", "y"), ("finished", "y"), ("finished", "z")]
        assert old.streamed == []


async def test_an_unreachable_router_is_logged_once_then_once_a_minute_and_when_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it closes
    client = RouterClient([address], down_for=0.0, route_timeout=2.0)
    caplog.set_level("INFO", logger="tokenyard.frontend.clients")
    try:
        for i in range(4):
            with pytest.raises(Unavailable):
                await client.route(request_id=f"u{i}", model=MODEL, block_hashes=[1], isl_tokens=16)
        warnings = [
            r.getMessage() for r in caplog.records if r.levelname == "WARNING" and address in r.getMessage()
        ]
        assert len(warnings) == 1 and "unreachable" in warnings[0], warnings
        # The router comes back at that address: one line says so.
        servicer = ScriptedRouter()  # type: ignore[abstract]  # serves only what the client calls
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
        server.add_insecure_port(address)
        await server.start()
        try:
            # The channel reconnects with its own backoff: the first calls may still fail.
            for attempt in range(40):
                try:
                    await client.route(
                        request_id=f"back{attempt}", model=MODEL, block_hashes=[1], isl_tokens=16
                    )
                    break
                except Unavailable:
                    await asyncio.sleep(0.25)
        finally:
            await server.stop(0)
        assert any("answers again" in r.getMessage() for r in caplog.records)
        # The router is gone again, its notification stream with it: closing the client must not
        # trip over the dead call.
        await asyncio.sleep(0.5)
    finally:
        await client.close()
