"""Router failover with real processes: two router replicas (replica sync), two mocker workers and
one frontend, driven through the OpenAI HTTP API.

One router is killed with SIGKILL while streaming requests are in flight: the frontend retries
its routes on the other replica and sends the lifecycle notifications there, so no client request
fails. The killed router is then started again and rebuilds the same index as its peer.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import grpc
import pytest

from tests.e2e.test_router_kv import _new_router, dump, eventually_true, instances, router_argv
from tests.fixtures.http import counter_total, frontend_serves
from tests.fixtures.processes import ServiceProcessFactory
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.common.discovery import Instance

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
REQUESTS = 120
CONCURRENCY = 16
MAX_TOKENS = 32
# The router is killed once this many requests have finished, so that the rest run without it.
KILL_AFTER = 30


def _prompt(i: int) -> str:
    # Eight long shared prefixes, so that the routers' indexes hold chains worth comparing.
    topic = ["rivers", "mountains", "harbours", "forests", "deserts", "glaciers", "islands", "valleys"][i % 8]
    return f"Tell me everything about {topic}. " * 40 + f"Question {i}: why?"


async def _stream_completion(session: aiohttp.ClientSession, http: str, i: int) -> tuple[int, str]:
    """Streams one completion; returns (completion tokens in the usage chunk, finish reason)."""
    body = {
        "model": MODEL,
        "prompt": _prompt(i),
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens, finish = -1, ""
    async with session.post(f"{http}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, finish


async def _routes(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        try:
            await stub.Route(
                router_pb2.RouteRequest(request_id="probe", model=MODEL, isl_tokens=1, dry_run=True),
                timeout=5,
            )
        except grpc.aio.AioRpcError:
            return False
        return True


async def _decisions(session: aiohttp.ClientSession, router: Instance) -> float:
    return await counter_total(
        session, f"http://{router.metrics_address}/metrics", "tokenyard_router_decisions"
    )


async def test_killing_a_router_mid_load_fails_no_request(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    workers = [
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
                "1",
            ]
        )
        for _ in range(2)
    ]
    a = spawn(router_argv(url, "--replica-sync"))
    ra = (await instances(url, "router", 1, [a]))[0]
    b = spawn(router_argv(url, "--replica-sync"))
    rb = await _new_router(url, {ra.instance_id}, b)
    frontend = spawn(["frontend", "--port", "0", "--http-port", "0", "--discovery", url])
    await instances(url, "worker", 2, workers)
    fe: Instance = (await instances(url, "frontend", 1, [frontend]))[0]
    http = f"http://{fe.metrics_address}"

    await eventually_true(lambda: _routes(ra.address), "the first router routes", 60)
    await eventually_true(lambda: _routes(rb.address), "the second router routes", 60)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await eventually_true(
            lambda: frontend_serves(session, http, MODEL), "the frontend serves the model", 60
        )

        results: list[tuple[int, str] | BaseException] = []
        done = asyncio.Event()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(REQUESTS):
            queue.put_nowait(i)

        async def client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    results.append(await _stream_completion(session, http, i))
                except (TimeoutError, AssertionError, aiohttp.ClientError) as exc:
                    results.append(exc)
                if len(results) >= KILL_AFTER:
                    done.set()

        before = await _decisions(session, rb)
        clients = [asyncio.create_task(client()) for _ in range(CONCURRENCY)]
        await done.wait()
        routed_by_b = await _decisions(session, rb) - before
        finished, queued = len(results), queue.qsize()
        b.kill()
        await asyncio.gather(*clients)

    print(f"router killed after {finished} requests, {queued} queued")
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} requests failed, first: {failures[0]!r}\n{frontend.output()}"
    assert len(results) == REQUESTS
    assert all(r == (MAX_TOKENS, "length") for r in results), {r for r in results}
    # The frontend used the victim (every router, not only the first), so the kill was felt.
    assert routed_by_b > 0

    restarted = spawn(router_argv(url, "--replica-sync"))
    fresh = await _new_router(url, {ra.instance_id, rb.instance_id}, restarted)

    async def same() -> bool:
        left, right = await dump(ra.address), await dump(fresh.address)
        return bool(left) and left == right

    # The acceptance bound: the restarted replica matches its peer within 5 s of registering.
    took = await eventually_true(same, "the restarted replica indexes what its peer does", timeout=5.0)
    print(f"restarted replica matched its peer's index {took:.2f}s after registering")

    assert frontend.terminate() == 0
    # Notifications of the victim's requests reached the survivor instead.
    assert not [line for line in frontend.output().splitlines() if "Notify" in line and "failed" in line]
    assert "Traceback" not in frontend.output() + a.output()
    assert all(p.proc.poll() is None for p in (a, restarted, *workers))
