"""KV-aware routing with real processes: router processes, mocker worker processes, gRPC clients.

The test plays the frontend: it hashes prompts, asks a router for a worker, generates there, and
notifies the router of the end. It checks that routing follows what the workers really cached,
and that a router killed with SIGKILL and started again rebuilds the same index as its replica
from the workers' snapshots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.fixtures.processes import ServiceProcess, ServiceProcessFactory
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Instance, open_discovery
from tokenyard.common.hashing import block_hashes

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
BS = 64


async def instances(
    url: str, service: str, count: int, procs: list[ServiceProcess], timeout: float = 60
) -> list[Instance]:
    discovery = open_discovery(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            found = await discovery.instances(service)
            if len(found) >= count:
                return found
            for p in procs:
                if p.proc.poll() is not None:
                    raise AssertionError(f"{p.argv} exited:\n{p.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} {service}(s) did not register in {timeout}s")
            await asyncio.sleep(0.1)
    finally:
        await discovery.close()


async def eventually_true(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> float:
    """Poll an async predicate; returns the seconds it took (the timeout only guards a hang)."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@dataclass
class Deployment:
    url: str
    workers: dict[int, Instance]
    procs: list[ServiceProcess]


def router_argv(url: str, *extra: str) -> list[str]:
    return [
        "router",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--discovery",
        url,
        "--discovery-ttl",
        "2",
        *extra,
    ]


@pytest.fixture
async def deployment(spawn: ServiceProcessFactory, tmp_path: Path) -> AsyncIterator[Deployment]:
    url = f"dir://{tmp_path / 'discovery'}"
    procs = [
        spawn(
            [
                "worker",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--discovery",
                url,
                "--mocker-speedup-ratio",
                "0",
            ]
        )
        for _ in range(2)
    ]
    workers = await instances(url, "worker", 2, procs)
    yield Deployment(url, {w.instance_id: w for w in workers}, procs)


async def route(
    stub: router_pb2_grpc.RouterServiceAsyncStub, rid: str, prompt: list[int]
) -> router_pb2.RouteResponse:
    local, _ = block_hashes(prompt, BS)
    return await stub.Route(
        router_pb2.RouteRequest(request_id=rid, model=MODEL, block_hashes=local, isl_tokens=len(prompt)),
        timeout=10,
    )


async def generate(worker: Instance, rid: str, prompt: list[int]) -> worker_pb2.GenerateResponse:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        request = worker_pb2.GenerateRequest(request_id=rid, model=MODEL, token_ids=prompt)
        request.stop.max_tokens = 2
        responses = [r async for r in stub.Generate(request, timeout=30)]
        return responses[-1]


async def serve_one(
    stub: router_pb2_grpc.RouterServiceAsyncStub, d: Deployment, rid: str, prompt: list[int]
) -> tuple[router_pb2.RouteResponse, worker_pb2.GenerateResponse]:
    decision = await route(stub, rid, prompt)
    done = await generate(d.workers[decision.worker_id], rid, prompt)
    await stub.NotifyFinished(
        router_pb2.NotifyFinishedRequest(request_id=rid, outcome=router_pb2.REQUEST_OUTCOME_FINISHED),
        timeout=5,
    )
    return decision, done


async def dump(address: str) -> set[tuple[int, int, int, int, int]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        out = set()
        async for msg in stub.Dump(router_pb2.DumpRequest(), timeout=10):
            for c in msg.chains:
                parent = c.parent_hash if c.HasField("parent_hash") else 0
                for b in c.blocks:
                    out.add((msg.worker_id, msg.dp_rank, int(msg.tier), parent, b.block_hash))
                    parent = b.block_hash
        return out


async def test_routing_follows_what_workers_cached(
    deployment: Deployment, spawn: ServiceProcessFactory
) -> None:
    d = deployment
    router = spawn(router_argv(d.url))
    inst = (await instances(d.url, "router", 1, [router]))[0]
    async with grpc.aio.insecure_channel(inst.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        await eventually_true(lambda: _knows_workers(inst, len(d.workers)), "the router knows both workers")
        # Cold requests tie, and ties go to a worker at random: with 12 of them, both workers get
        # some but for a 1-in-2048 chance.
        prefixes = [[p * 10_000 + i for i in range(6 * BS)] for p in range(12)]
        first: dict[int, int] = {}
        for p, prefix in enumerate(prefixes):
            decision, _ = await serve_one(stub, d, f"warm-{p}", [*prefix, *range(p, p + 10)])
            first[p] = decision.worker_id
        assert set(first.values()) == set(d.workers), "cold requests spread over both workers"

        await eventually_true(lambda: _all_indexed(stub, prefixes), "the router indexed every warm prefix")
        for p, prefix in enumerate(prefixes):
            decision, done = await serve_one(stub, d, f"hot-{p}", [*prefix, *range(100 + p, 200 + p)])
            assert decision.worker_id == first[p] and decision.overlap_blocks == 6
            assert done.usage.cached_tokens == 6 * BS, "the worker really had the prefix"


async def _knows_workers(router: Instance, count: int) -> bool:
    """The router's worker set (its /metrics gauge) has ``count`` workers."""
    reader, writer = await asyncio.open_connection(*router.metrics_address.rsplit(":", 1))
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    await writer.wait_closed()
    for line in text.splitlines():
        if line.startswith("tokenyard_router_workers_registered "):
            return float(line.split()[1]) == count
    return False


async def _all_indexed(stub: router_pb2_grpc.RouterServiceAsyncStub, prefixes: list[list[int]]) -> bool:
    for prefix in prefixes:
        local, _ = block_hashes(prefix, BS)
        reply = await stub.QueryOverlap(
            router_pb2.QueryOverlapRequest(model=MODEL, block_hashes=local), timeout=5
        )
        if max((o.matched_blocks for o in reply.overlaps), default=0) < 6:
            return False
    return True


async def test_killed_replica_rebuilds_the_same_index(
    deployment: Deployment, spawn: ServiceProcessFactory
) -> None:
    d = deployment
    a = spawn(router_argv(d.url, "--replica-sync"))
    ra = (await instances(d.url, "router", 1, [a]))[0]
    b = spawn(router_argv(d.url, "--replica-sync"))
    rb = await _new_router(d.url, {ra.instance_id}, b)
    async with grpc.aio.insecure_channel(ra.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for i in range(6):
            await serve_one(stub, d, f"w-{i}", [i * 1000 + j for j in range(3 * BS + 5)])

    async def same(x: str, y: str) -> bool:
        left, right = await dump(x), await dump(y)
        return bool(left) and left == right

    await eventually_true(lambda: same(ra.address, rb.address), "both replicas index the same blocks")
    b.kill()
    async with grpc.aio.insecure_channel(ra.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        await serve_one(stub, d, "during", [7] * (2 * BS))
    restarted = spawn(router_argv(d.url, "--replica-sync"))
    started = time.monotonic()
    fresh = await _new_router(d.url, {ra.instance_id, rb.instance_id}, restarted)
    took = await eventually_true(lambda: same(ra.address, fresh.address), "the restarted replica caught up")
    print(
        f"restarted replica matched its peer's index {time.monotonic() - started:.2f}s after start "
        f"({took:.2f}s after registering)"
    )
    # Replica streams end at shutdown instead of holding it open.
    assert a.terminate() == 0 and restarted.terminate() == 0
    assert "Traceback" not in a.output() + restarted.output()


async def _new_router(url: str, old: set[int], proc: ServiceProcess) -> Instance:
    discovery = open_discovery(url)
    try:
        deadline = time.monotonic() + 60
        while True:
            for r in await discovery.instances("router"):
                if r.instance_id not in old:
                    return r
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"restarted router did not register:\n{proc.output()}")
            await asyncio.sleep(0.05)
    finally:
        await discovery.close()
