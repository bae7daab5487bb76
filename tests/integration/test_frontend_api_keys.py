"""The frontend's API keys with ``--auth-probes``: probes and scrapes need a key too."""

from __future__ import annotations

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
