"""Standby failover with real processes: an active worker and a standby share a lock file
(``--standby-lock``); the standby has its engine ready but is not registered. The active worker
is SIGKILLed while serving streams through the frontend: the standby takes the lock, registers and
serves within 2 s, and every stream in flight migrates to it and finishes.

The default suite runs it with mocker workers (seconds); the slow variant runs CPU workers whose
weights the standby maps from a gms before the kill.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.test_router_kv import eventually_true, instances, router_argv
from tests.fixtures.http import counter_total, frontend_serves
from tests.fixtures.processes import ServiceProcess, ServiceProcessFactory, gms_process
from tokenyard.common.discovery import open_discovery
from tokenyard.common.gms import LockState, get_info

pytestmark = [
    pytest.mark.e2e,
]

MODEL = "SmolLM2-135M-Instruct"


async def _stream(
    session: aiohttp.ClientSession, http: str, body: dict[str, object], started: asyncio.Event
) -> tuple[int, str]:
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
                if choice.get("text"):
                    started.set()
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, finish


async def _registered_workers(url: str) -> set[int]:
    discovery = open_discovery(url)
    try:
        return {i.instance_id for i in await discovery.instances("worker")}
    finally:
        await discovery.close()


async def _failover(
    spawn: ServiceProcessFactory,
    url: str,
    worker_argv: list[str],
    bodies: list[dict[str, object]],
    *,
    ready_timeout: float,
    standby_ready: object = None,
) -> tuple[float, ServiceProcess]:
    """Start active, standby, router and frontend; kill the active mid-stream; returns the
    seconds from the kill to the standby's registration, and the standby."""
    active = spawn(worker_argv)
    first = (await instances(url, "worker", 1, [active], timeout=ready_timeout))[0]
    standby = spawn(worker_argv)
    router = spawn(router_argv(url))
    frontend = spawn(["frontend", "--port", "0", "--http-port", "0", "--discovery", url])
    fe = (await instances(url, "frontend", 1, [router, frontend]))[0]
    http = f"http://{fe.metrics_address}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await eventually_true(lambda: frontend_serves(session, http, MODEL), "the frontend serves", 60)
        if callable(standby_ready):
            await eventually_true(standby_ready, "the standby is ready", ready_timeout)

        async def standby_waits() -> bool:
            return "another worker holds" in standby.output()

        await eventually_true(standby_waits, "the standby waits for the lock", ready_timeout)
        # The standby is up but not registered: it waits for the lock.
        assert standby.proc.poll() is None, standby.output()
        assert await _registered_workers(url) == {first.instance_id}

        started = [asyncio.Event() for _ in bodies]
        tasks = [
            asyncio.create_task(_stream(session, http, b, e)) for b, e in zip(bodies, started, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        active.kill()
        killed_at = time.monotonic()
        while not (await _registered_workers(url)) - {first.instance_id}:
            assert time.monotonic() - killed_at < 10, standby.output()
            await asyncio.sleep(0.01)
        takeover = time.monotonic() - killed_at
        results = await asyncio.gather(*tasks, return_exceptions=True)
        migrations = await counter_total(session, f"{http}/metrics", "tokenyard_frontend_model_migration")
        # New requests are served by the standby alone.
        assert await frontend_serves(session, http, MODEL)

    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} streams failed, first: {failures[0]!r}\n{frontend.output()}"
    for body, result in zip(bodies, results, strict=True):
        assert result == (body["max_tokens"], "length")
    assert migrations >= len(bodies)
    print(f"standby registered {takeover * 1000:.0f} ms after the kill; {migrations:.0f} migrations")
    assert "took over" in standby.output()
    return takeover, standby


def _bodies(n: int, max_tokens: int) -> list[dict[str, object]]:
    return [
        {
            "model": MODEL,
            "prompt": f"Story {i}: the lighthouse keeper",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "seed": 100 + i,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(n)
    ]


async def test_the_standby_takes_over_and_no_stream_fails(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    worker_argv = [
        "worker",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--discovery",
        url,
        "--standby-lock",
        str(tmp_path / "worker.lock"),
        "--mocker-speedup-ratio",
        "1",
        "--mocker-decode-speedup-ratio",
        "0.5",
    ]
    takeover, _ = await _failover(spawn, url, worker_argv, _bodies(24, 200), ready_timeout=60)
    assert takeover < 2.0


@pytest.mark.slow
async def test_a_cpu_standby_with_gms_weights_takes_over_under_load(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    async with gms_process(spawn, url) as gms_socket:
        worker_argv = [
            "worker",
            "--engine",
            "cpu",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--discovery",
            url,
            "--standby-lock",
            str(tmp_path / "worker.lock"),
            "--cpu-gms",
            "--cpu-gms-socket",
            gms_socket,
            "--cpu-num-threads",
            "1",
            "--cpu-num-kv-blocks",
            "256",
        ]

        async def both_map_the_weights() -> bool:
            info = await asyncio.to_thread(get_info, gms_socket)
            return info.state is LockState.RO and info.reader_count == 2

        takeover, standby = await _failover(
            spawn, url, worker_argv, _bodies(6, 40), ready_timeout=300, standby_ready=both_map_the_weights
        )
        assert takeover < 2.0
        # The standby never loaded the weights itself: it mapped the active worker's copy.
        assert "mapped SmolLM2" in standby.output() and "published" not in standby.output()
        info = await asyncio.to_thread(get_info, gms_socket)
        assert (info.state, info.reader_count) == (LockState.RO, 1)
