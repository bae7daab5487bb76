"""`tokenyard worker` as its own process: registers with its model card, serves health, reflection,
/metrics and Generate, and exits 0 on SIGTERM after deregistering."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.fixtures.processes import ServiceProcessFactory, wait_for_instance
from tests.fixtures.worker import MODEL, eventually, generate_request
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import open_discovery

pytestmark = pytest.mark.integration

SERVICE = "tokenyard.api.worker.v1.WorkerService"


def reflect(address: str) -> tuple[set[str], set[str]]:
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        listed = set(db.get_services())
        methods = {m.name for m in DescriptorPool(db).FindServiceByName(SERVICE).methods}
    return listed, methods


def scrape(metrics_address: str) -> str:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def test_worker_process_registers_serves_and_exits_cleanly(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    proc = spawn(
        [
            "worker",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--discovery",
            url,
            "--grace-period",
            "3",
            "--mocker-speedup-ratio",
            "0",
            "--mocker-block-size",
            "16",
            "--mocker-num-gpu-blocks",
            "512",
            "--reasoning-parser",
            "think",
            "--tool-call-parser",
            "hermes",
        ]
    )
    instance = await wait_for_instance(url, "worker", proc=proc)
    assert instance.role == "aggregated"
    assert instance.model_card is not None
    assert instance.model_card.to_dict() == {
        "model": MODEL,
        "tokenizer": "smollm2",
        "block_size": 16,
        "context_length": 16 * 512,
        "total_kv_blocks": 512,
        "engine": "mocker",
        "role": "aggregated",
        "reasoning_parser": "think",
        "tool_call_parser": "hermes",
        "structured_output": [],
    }

    async with grpc.aio.insecure_channel(instance.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await eventually(serving, "the worker reports SERVING")
        listed, methods = await asyncio.to_thread(reflect, instance.address)
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
        assert {"Generate", "SubscribeKvEvents", "GetLoad", "Describe", "Drain", "FetchKvBlocks"} <= methods

        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        responses = [r async for r in stub.Generate(generate_request("p1", range(100), 8), timeout=30)]
        assert sum(len(r.token_ids) for r in responses) == 8
        assert responses[-1].usage.prompt_tokens == 100

        body = await asyncio.to_thread(scrape, instance.metrics_address)
        assert 'tokenyard_up{service="worker"} 1.0' in body
        assert 'tokenyard_worker_requests_total{reason="length"} 1.0' in body

        # A router's event stream ends cleanly on SIGTERM instead of being cut at the grace period.
        events = stub.SubscribeKvEvents(worker_pb2.SubscribeKvEventsRequest())
        first = await events.read()
        assert isinstance(first, worker_pb2.SubscribeKvEventsResponse) and first.HasField("snapshot")
        proc.proc.terminate()
        while isinstance(
            await asyncio.wait_for(events.read(), timeout=30), worker_pb2.SubscribeKvEventsResponse
        ):
            pass
        assert await events.code() == grpc.StatusCode.OK

    assert proc.terminate() == 0, proc.output()
    discovery = open_discovery(url)
    try:
        assert await discovery.instances("worker") == []
    finally:
        await discovery.close()


async def test_an_unavailable_engine_is_a_one_line_startup_error(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    proc = spawn(
        [
            "worker",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--engine",
            "vllm",
            "--discovery",
            f"dir://{tmp_path}",
        ]
    )
    code = await asyncio.to_thread(proc.proc.wait, 60)
    assert code == 1
    assert "--engine / TOKENYARD_WORKER_ENGINE" in proc.output()
    assert "Traceback" not in proc.output()
