"""Every service runs as its own process: registers, answers health, reflection and /metrics,
and on SIGTERM deregisters and exits 0 within its grace period."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.fixtures.processes import ServiceProcessFactory, wait_for_instance
from tokenyard.common.discovery import open_discovery

pytestmark = pytest.mark.e2e

GRACE = 3.0

# service -> (extra flags, the service its reflection must list, the RPCs that service must have)
SERVICES: dict[str, tuple[list[str], str, set[str]]] = {
    "router": (
        ["--port", "0", "--metrics-port", "0"],
        "tokenyard.api.router.v1.RouterService",
        {"Route", "NotifyFirstToken", "NotifyFinished", "Dump", "QueryOverlap"},
    ),
    "planner": (
        ["--port", "0", "--metrics-port", "0"],
        "tokenyard.api.planner.v1.PlannerService",
        {"GetDecision"},
    ),
    "gms": (
        ["--metrics-port", "0"],
        "tokenyard.api.gms.v1.GmsService",
        {"GetInfo", "Allocate", "Commit", "Lock"},
    ),
    "worker": (
        ["--port", "0", "--metrics-port", "0", "--mocker-speedup-ratio", "0"],
        "tokenyard.api.worker.v1.WorkerService",
        {"Generate", "SubscribeKvEvents", "Drain"},
    ),
    # The frontend serves /metrics on its HTTP port, which its record advertises.
    "frontend": (
        ["--port", "0", "--http-port", "0"],
        "inference.GRPCInferenceService",
        {"ModelInfer", "ModelStreamInfer", "ModelConfig", "ServerLive"},
    ),
}


def _health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _reflect(address: str, service: str) -> tuple[set[str], set[str]]:
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        listed = set(db.get_services())
        pool = DescriptorPool(db)
        methods = {m.name for m in pool.FindServiceByName(service).methods}
    return listed, methods


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_service_lifecycle(service: str, spawn: ServiceProcessFactory, tmp_path: Path) -> None:
    flags, full_name, rpcs = SERVICES[service]
    url = f"dir://{tmp_path / 'discovery'}"
    extra = ["--socket", str(tmp_path / "gms.sock")] if service == "gms" else []
    proc = spawn([service, *flags, *extra, "--discovery", url, "--grace-period", str(GRACE)])
    instance = await wait_for_instance(url, service, proc=proc)

    deadline = time.monotonic() + 10
    while _health(instance.address) != "SERVING":
        assert time.monotonic() < deadline, "never became SERVING"
        time.sleep(0.05)

    listed, methods = _reflect(instance.address, full_name)
    assert {full_name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
    assert rpcs <= methods

    with urllib.request.urlopen(f"http://{instance.metrics_address}/metrics", timeout=5) as reply:
        body = reply.read().decode()
    assert reply.status == 200
    assert f'tokenyard_up{{service="{service}"}} 1.0' in body
    assert "process_cpu_seconds_total" in body

    started = time.monotonic()
    assert proc.terminate(timeout=GRACE + 10) == 0, proc.output()
    assert time.monotonic() - started < GRACE + 5
    discovery = open_discovery(url)
    try:
        assert await discovery.instances(service) == []
    finally:
        await discovery.close()
    assert "Traceback" not in proc.output()
