"""Routing hints from the HTTP body to the router: a frontend in front of a router process and a
mocker worker; ``nvext.session_id`` reaches the router (its session metrics say so) alongside
``nvext.expected_output_tokens``, and malformed hints are 400s."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.frontend import FrontendStack, frontend_stack, router_process
from tests.fixtures.processes import wait_for_instance
from tests.fixtures.worker import MODEL
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = pytest.mark.integration


async def router_metric(stack: FrontendStack, discovery: str, name: str) -> float:
    router = await wait_for_instance(discovery, "router")
    async with stack.http.get(f"http://{router.metrics_address}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_a_sessions_turns_follow_it_and_bad_hints_are_400s(tmp_path: Path) -> None:
    mocker = MockerConfig(block_size=16, num_gpu_blocks=256, speedup_ratio=0)
    with router_process(tmp_path, "--mode", "kv") as router:
        async with frontend_stack(router, mocker) as s:
            discovery = router[0]
            body = {
                "model": MODEL,
                "prompt": "one two three four five six seven eight nine ten",
                "max_tokens": 4,
                "nvext": {"session_id": "chat-1", "expected_output_tokens": 4},
            }
            for _ in range(3):
                status, reply = await s.post("/v1/completions", body)
                assert status == 200, reply
            placed = await router_metric(
                s, discovery, 'tokenyard_router_session_routes_total{outcome="placed"}'
            )
            followed = await router_metric(
                s, discovery, 'tokenyard_router_session_routes_total{outcome="followed"}'
            )
            assert (placed, followed) == (1, 2)
            status, reply = await s.post("/v1/completions", {**body, "nvext": {"session_id": "x" * 300}})
            assert status == 400 and "session_id" in str(reply)
            status, reply = await s.post("/v1/completions", {**body, "nvext": {"expected_output_tokens": 0}})
            assert status == 400 and "expected_output_tokens" in str(reply)
