"""When the router finds every worker busy, clients hear it: 529 (the default overload status) on
OpenAI HTTP and RESOURCE_EXHAUSTED on KServe, and requests are served again once load falls.

A router process whose busy threshold is a sliver of the KV cache, one real-time mocker worker,
and a frontend in this process: one long request makes the only worker busy."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio

from tests.fixtures.frontend import router_process
from tests.fixtures.processes import ServiceProcess, wait_for_instance
from tests.fixtures.worker import MODEL, eventually, running_worker
from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

REAL_TIME = MockerConfig(speedup_ratio=1, block_size=4, num_gpu_blocks=8192, max_model_len=8192)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServiceProcess]]:
    # 0.1 % of 8192 blocks: any running request makes the worker busy.
    flags = ("--mode", "kv", "--active-decode-blocks-threshold", "0.001")
    with router_process(tmp_path_factory.mktemp("frontend-overload"), *flags) as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def frontend(router: tuple[str, ServiceProcess]) -> AsyncIterator[FrontendServer]:
    discovery, proc = router
    await wait_for_instance(discovery, "router", proc=proc)
    settings = FrontendSettings(host="127.0.0.1", port=0, http_port=0, discovery=discovery, grace_period=1.0)
    async with running_worker(REAL_TIME, discovery=discovery), FrontendServer(settings) as server:
        yield server


async def test_all_workers_busy_is_529_and_resource_exhausted_then_served_again(
    frontend: FrontendServer,
) -> None:
    base = f"http://127.0.0.1:{frontend.http_port}"
    short = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    async with aiohttp.ClientSession() as http:

        async def status() -> int:
            async with http.post(base + "/v1/completions", json=short) as r:
                await r.read()
                return r.status

        async def serves() -> bool:
            return await status() == 200

        await eventually(serves, "the frontend serves the model")
        long_body = {**short, "max_tokens": 5000, "ignore_eos": True, "stream": True}
        holder = await http.post(base + "/v1/completions", json=long_body)
        assert holder.status == 200
        busy: list[Any] = []

        async def refused() -> bool:
            async with http.post(base + "/v1/completions", json=short) as r:
                if r.status == 529:
                    busy.append(await r.json())
                    return True
                return False

        # The worker's load reaches the router within its report interval.
        await eventually(refused, "the router finds the worker busy")
        assert busy[0]["error"]["type"] == "overloaded_error" and busy[0]["error"]["code"] == 529
        async with grpc.aio.insecure_channel(frontend.address) as channel:
            request = pb.ModelInferRequest(model_name=MODEL)
            tensor = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
            tensor.contents.bytes_contents.append(b"x")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        holder.close()
        await eventually(serves, "requests are served once the long one is gone")
        text = await (await http.get(base + "/metrics")).text()
    rejected = [
        line for line in text.splitlines() if line.startswith("tokenyard_frontend_model_rejection_total{")
    ]
    assert any('reason="overload"' in line and not line.endswith(" 0.0") for line in rejected), json.dumps(
        rejected
    )
