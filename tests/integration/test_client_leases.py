"""Client leases against a real router on loopback: the requests of a frontend that dies are
released even when it showed a sign of life after its notification stream broke, and a live
frontend whose connection broke reopens its stream and keeps its long requests counted.

A frontend dies as a process killed with SIGKILL; a connection breaks at a TCP proxy between the
frontend's router client and the router, which resets every connection through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from tests.fixtures.worker import MODEL
from tests.integration.test_router_route_bounds import BS, RELEASE_AFTER, eventually, stack
from tokenyard.frontend import clients
from tokenyard.frontend.clients import RouterClient
from tokenyard.frontend.generation import Outcome

pytestmark = pytest.mark.integration

# The frontend of the first test: it routes three requests and opens its notification stream,
# the stream breaks (the call is cancelled: to the router, a broken stream), it routes one more
# request (a sign of life) and waits to be killed, as a frontend that dies just after a blip.
_DYING_FRONTEND = """
import asyncio, sys, uuid
import grpc
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc

async def main(address: str, model: str, bs: int) -> None:
    identity = (("tokenyard-client", uuid.uuid4().hex),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        async def route(rid: str) -> None:
            request = router_pb2.RouteRequest(
                request_id=rid, model=model, block_hashes=[1, 2, 3, 4], isl_tokens=4 * bs
            )
            await stub.Route(request, timeout=10, metadata=identity)
        for i in range(3):
            await route(f"dying-{i}")
        call = stub.StreamNotifications(metadata=identity)
        note = router_pb2.LifecycleNotification(
            first_token=router_pb2.NotifyFirstTokenRequest(request_id="dying-0")
        )
        await call.write(router_pb2.StreamNotificationsRequest(notifications=[note]))
        assert (await call.read()).handled == 1
        call.cancel()
        print("broken", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await route("dying-3")
        print("routed", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_a_frontend_killed_after_one_sign_of_life_past_a_break_is_released() -> None:
    async with stack() as s:
        leases = s.server.router.servicer.leases
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _DYING_FRONTEND,
            s.server.address,
            MODEL,
            str(BS),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            assert await asyncio.wait_for(child.stdout.readline(), 30) == b"broken\n"
            await eventually(lambda: s.active == 3 and leases.open_streams() == 0, "the router saw the break")
            child.stdin.write(b"go\n")
            await child.stdin.drain()
            assert await asyncio.wait_for(child.stdout.readline(), 30) == b"routed\n"
            assert s.active == 4
            child.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            # The Route after the break put the release off; it did not call it off.
            await eventually(lambda: s.active == 0, "the dead frontend's requests were released", 10)
            assert time.monotonic() - killed < RELEASE_AFTER + 2.0
            assert leases.released == 4
        finally:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()


class ResettingProxy:
    """Forwards TCP connections to ``upstream``; :meth:`reset` aborts every connection through it
    (both sides see a reset, as after a network blip), and new connections go through again."""

    def __init__(self, upstream: str) -> None:
        self._host, port = upstream.rsplit(":", 1)
        self._port = int(port)
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.address = ""

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def reset(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ResettingProxy]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            self.reset()
            for task in list(self._tasks):
                task.cancel()
            await server.wait_closed()


@pytest.mark.parametrize("reopens", [True, False], ids=["reopening", "without-reopening"])
async def test_a_live_frontend_whose_connection_broke_keeps_its_long_requests(
    reopens: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not reopens:
        # The control: a client that stays silent after the break (as one that reopens its stream
        # only to send a notification) loses its requests, so the first case shows the reopening.
        monkeypatch.setattr(clients, "REOPEN_FIRST_SECONDS", 3600.0)
        monkeypatch.setattr(clients, "REOPEN_MAX_SECONDS", 3600.0)
    async with stack() as s, ResettingProxy(s.server.address).running() as proxy:
        leases = s.server.router.servicer.leases
        client = RouterClient([proxy.address])
        try:
            # Long generations: routed, and nothing more to say about them for a while.
            ids = [f"long-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
            for rid in ids:
                await client.route(request_id=rid, model=MODEL, block_hashes=[1, 2], isl_tokens=2 * BS)
            await eventually(lambda: leases.open_streams() == 1, "the client opened its stream")
            proxy.reset()
            await eventually(lambda: leases.open_streams() == 0, "the router saw the stream break")
            if not reopens:
                await eventually(lambda: s.active == 0, "the silent client's requests were released")
                assert leases.released == 2
                return
            await eventually(lambda: leases.open_streams() == 1, "the client reopened its stream", 5)
            await asyncio.sleep(RELEASE_AFTER * 4)
            assert s.active == 2 and leases.released == 0
            # The stream it reopened carries the notifications again, and frees the requests.
            for rid in ids:
                client.notify_finished(rid, Outcome.FINISHED, 100)
            await client.flush()
            assert s.active == 0 and leases.released == 0
        finally:
            await client.close()
