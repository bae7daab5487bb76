"""Request migration with real processes: one router, two mocker workers and one frontend, driven
through the OpenAI HTTP API.

A worker serving 80 streams is killed with SIGKILL (the other worker joins just before). The frontend moves each
of its requests to the other worker with the tokens generated so far, so every client sees one
stream that ends with the length it asked for, and (the mocker's tokens depend only on the seed
and the position) the same text as a request that never moved.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_router_kv import eventually_true, instances, router_argv
from tests.fixtures.http import counter_total, frontend_serves
from tests.fixtures.processes import ServiceProcessFactory
from tokenyard.common.discovery import Instance

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
STREAMS = 80


def _max_tokens(i: int) -> int:
    # Long enough that every stream is still running when the victim dies.
    return 400 + i % 48


def _body(i: int) -> dict[str, object]:
    return {
        "model": MODEL,
        "prompt": f"Story {i}: once upon a time there was a lighthouse keeper who",
        "max_tokens": _max_tokens(i),
        "ignore_eos": True,
        "seed": 1000 + i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class Result:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.completion_tokens = -1
        self.finish = ""


async def _stream(session: aiohttp.ClientSession, http: str, i: int, started: asyncio.Event | None) -> Result:
    result = Result()
    async with session.post(f"{http}/v1/completions", json=_body(i)) as response:
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            for choice in event.get("choices", []):
                result.text.append(choice.get("text", ""))
                result.finish = choice.get("finish_reason") or result.finish
                if started is not None and choice.get("text"):
                    started.set()
            if event.get("usage"):
                result.completion_tokens = event["usage"]["completion_tokens"]
    return result


async def _router_sample(session: aiohttp.ClientSession, router: Instance, name: str, **labels: str) -> float:
    """One sample of the router's /metrics (0 when absent)."""
    async with session.get(f"http://{router.metrics_address}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def _migrations(session: aiohttp.ClientSession, http: str) -> float:
    return await counter_total(session, f"{http}/metrics", "tokenyard_frontend_model_migration")


async def test_killing_a_worker_mid_stream_fails_no_request(
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
        "--mocker-speedup-ratio",
        "1",
        # Decode at half speed: every stream is still running when the last one has started,
        # even on a loaded machine.
        "--mocker-decode-speedup-ratio",
        "0.5",
    ]
    # Every stream starts on the victim, the only worker at first; the survivor joins before the kill.
    victim_proc = spawn(worker_argv)
    victim = (await instances(url, "worker", 1, [victim_proc]))[0]
    router_proc = spawn(router_argv(url))
    frontend = spawn(["frontend", "--port", "0", "--http-port", "0", "--discovery", url])
    fe = (await instances(url, "frontend", 1, [router_proc, frontend]))[0]
    router = (await instances(url, "router", 1, [router_proc]))[0]
    http = f"http://{fe.metrics_address}"

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await eventually_true(
            lambda: frontend_serves(session, http, MODEL), "the frontend serves the model", 60
        )

        started = [asyncio.Event() for _ in range(STREAMS)]
        tasks = [asyncio.create_task(_stream(session, http, i, started[i])) for i in range(STREAMS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        survivor_proc = spawn(worker_argv)
        await instances(url, "worker", 2, [survivor_proc])

        async def router_knows_both() -> bool:
            return await _router_sample(session, router, "tokenyard_router_workers_registered") == 2

        await eventually_true(router_knows_both, "the router knows the survivor", 30)
        on_victim = await _router_sample(
            session, router, "tokenyard_router_worker_active_requests", worker_id=str(victim.instance_id)
        )
        victim_proc.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        migrations = await _migrations(session, http)

        # The same requests again, now served by the survivor alone and never moved.
        survivor_only = await asyncio.gather(*(_stream(session, http, i, None) for i in range(STREAMS)))

    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} streams failed, first: {failures[0]!r}\n{frontend.output()}"
    print(f"killed the worker serving {on_victim:.0f} of {STREAMS} streams; {migrations:.0f} migrations")
    # The victim was serving 50 or more streams when it died, and every one of them moved.
    assert on_victim >= 50
    assert migrations >= on_victim
    for i, r in enumerate(results):
        assert isinstance(r, Result)
        assert (r.completion_tokens, r.finish) == (_max_tokens(i), "length"), i
        assert "".join(r.text) == "".join(survivor_only[i].text), f"request {i} diverged after migrating"
    assert "Traceback" not in frontend.output()
    assert frontend.terminate() == 0
