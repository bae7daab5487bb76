"""A frontend process under faults around it: readiness follows its router and workers while
liveness does not, and running out of descriptors costs a few log lines, not a traceback per
failed accept."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.processes import ServiceProcessFactory, wait_for_instance
from tokenyard.frontend.server import READY_HEALTH_SERVICE

pytestmark = pytest.mark.e2e


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.2)


def _mocker(discovery: str) -> list[str]:
    return [
        "worker",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--discovery",
        discovery,
        "--mocker-speedup-ratio",
        "0",
    ]


def _grpc_health(address: str, service: str = "") -> str:
    """What `tokenyard probe` (and a Kubernetes gRPC probe) sees: the status's name."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_ready_follows_the_router_and_the_workers_live_does_not(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    discovery = f"dir://{tmp_path / 'discovery'}"
    router = spawn(["router", "--port", "0", "--metrics-port", "0", "--discovery", discovery])
    worker = spawn(_mocker(discovery))
    spawn(["frontend", "--port", "0", "--http-port", "0", "--discovery", discovery])
    frontend = asyncio.run(wait_for_instance(discovery, "frontend"))
    base = f"http://{frontend.metrics_address}"
    _until(lambda: _get(base + "/health/ready")[0] == 200, "ready with a router and a worker")
    assert _grpc_health(frontend.address, READY_HEALTH_SERVICE) == "SERVING"

    router.terminate()
    _until(lambda: _get(base + "/health/ready")[0] == 503, "not ready without a router")
    # The gRPC probes see the same: readiness follows, liveness (the whole server) does not.
    _until(lambda: _grpc_health(frontend.address, READY_HEALTH_SERVICE) == "NOT_SERVING", "gRPC not ready")
    assert _grpc_health(frontend.address) == "SERVING"
    _, doc = _get(base + "/health/ready")
    assert doc["ready"] is False and "router" in str(doc["reason"])
    assert _get(base + "/health/live") == (200, {"status": "live"})
    assert _get(base + "/health")[0] == 200  # as before: the frontend itself is up

    spawn(["router", "--port", "0", "--metrics-port", "0", "--discovery", discovery])
    _until(lambda: _get(base + "/health/ready")[0] == 200, "ready again with a new router")
    _until(lambda: _grpc_health(frontend.address, READY_HEALTH_SERVICE) == "SERVING", "gRPC ready again")

    worker.terminate()
    _until(lambda: _get(base + "/health/ready")[0] == 503, "not ready without a worker")
    assert "worker" in str(_get(base + "/health/ready")[1]["reason"])
    assert _get(base + "/health/live")[0] == 200


def _few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _hold_connections(port: int, count: int, probe: bool) -> tuple[list[socket.socket], int]:
    """``count`` connections (or as many as connect); with ``probe``, how many were answered 503."""
    held: list[socket.socket] = []
    refused = 0
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            break
        held.append(sock)
    for sock in held if probe else ():
        sock.settimeout(0.05)
        try:
            if sock.recv(64).startswith(b"HTTP/1.1 503"):
                refused += 1
        except OSError:
            pass
    return held, refused


@pytest.mark.parametrize("limit", ["0", "100000"])
def test_running_out_of_descriptors_is_a_503_or_a_few_log_lines(
    spawn: ServiceProcessFactory, tmp_path: Path, limit: str
) -> None:
    """``0``: the limit derived from the descriptor limit refuses with 503 before descriptors run out;
    ``100000``: a limit above what the process may open, so accept() itself fails (EMFILE)."""
    discovery = f"dir://{tmp_path / 'discovery'}"
    argv = [
        "frontend",
        "--port",
        "0",
        "--http-port",
        "0",
        "--discovery",
        discovery,
        "--http-max-connections",
        limit,
    ]
    proc = spawn(argv, preexec_fn=_few_descriptors)
    frontend = asyncio.run(wait_for_instance(discovery, "frontend", proc=proc))
    port = int(frontend.metrics_address.rsplit(":", 1)[1])
    held, refused = _hold_connections(port, 400, probe=limit == "0")
    try:
        time.sleep(3)  # let the listener retry a few times while descriptors are exhausted
    finally:
        for sock in held:
            sock.close()
    _until(lambda: _get(f"http://127.0.0.1:{port}/health")[0] == 200, "the frontend serves again")
    log = proc.output()
    assert "Traceback" not in log
    if limit == "0":
        assert refused > 0, log[-2000:]
        assert "socket.accept() out of system resource" not in log
    else:
        failures = [line for line in log.splitlines() if "accepting an HTTP connection failed" in line]
        assert 1 <= len(failures) <= 5, log[-2000:]
        assert "Too many open files" in failures[0]
    assert len(log) < 200_000
