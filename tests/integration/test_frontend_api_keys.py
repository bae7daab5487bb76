"""The frontend's API keys with ``--auth-probes``: probes and scrapes need a key too."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer

pytestmark = pytest.mark.integration

KEY = "sk-probe-key-0123456789abcdef"


async def _health(address: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), metadata=metadata, timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("protect", [True, False])
async def test_probes_need_a_key_only_when_asked(protect: bool) -> None:
    settings = FrontendSettings(
        host="127.0.0.1", port=0, http_port=0, discovery="memory://", api_keys=KEY, auth_probes=protect
    )
    async with FrontendServer(settings) as frontend, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{frontend.http_port}"
        for path in ("/health", "/metrics"):
            async with http.get(base + path) as response:
                assert response.status == (401 if protect else 200), path
            async with http.get(base + path, headers={"Authorization": f"Bearer {KEY}"}) as response:
                assert response.status == 200, path
        # Everything else needs a key whatever --auth-probes says.
        async with http.get(base + "/v1/models") as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"
        no_key = await _health(frontend.address, ())
        assert no_key == (grpc.StatusCode.UNAUTHENTICATED if protect else grpc.StatusCode.OK)
        assert await _health(frontend.address, (("authorization", f"Bearer {KEY}"),)) == grpc.StatusCode.OK


async def test_a_refused_request_stops_the_header_timer() -> None:
    """A 401 ends a request like any other: the kept-alive connection then gets no stray 408."""
    settings = FrontendSettings(
        host="127.0.0.1",
        port=0,
        http_port=0,
        discovery="memory://",
        api_keys=KEY,
        http_header_timeout=1.0,
        http_idle_timeout=30.0,
    )
    async with FrontendServer(settings) as frontend:
        reader, writer = await asyncio.open_connection("127.0.0.1", frontend.http_port)
        try:
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 401"), head
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            await asyncio.wait_for(reader.readexactly(length), 5)
            # Past the header timeout: the connection is idle between requests, nothing is due.
            with pytest.raises(TimeoutError):
                extra = await asyncio.wait_for(reader.read(65536), 2.0)
                pytest.fail(f"unasked bytes after the 401: {extra[:60]!r}")
        finally:
            writer.close()


async def test_kserve_refuses_without_parsing_the_request() -> None:
    """Bytes that are no protobuf at all: refused as unauthenticated, never parsed (which would
    fail as INTERNAL, after the frontend spent the work)."""
    settings = FrontendSettings(host="127.0.0.1", port=0, http_port=0, discovery="memory://", api_keys=KEY)
    async with FrontendServer(settings) as frontend, grpc.aio.insecure_channel(frontend.address) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await infer(b"\xff\xff\xff\xff not a protobuf", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
