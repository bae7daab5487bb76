"""Disaggregated serving survives its prefill worker: real processes (a KV router, one prefill and
one decode mocker worker, a frontend), driven with the openai package.

30 split requests are in their prefill stage (the simulated KV hand-off is slow on purpose) when
the prefill worker is killed with SIGKILL. Each one falls back to its decode worker, which
computes the prompt itself, and so do the requests sent after the kill while the dead worker's
lease has not expired yet: every request completes with the length it asked for, and the router
ends up tracking nothing. With two prefill workers, the dead one's requests are prefilled by the
other instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_router_kv import eventually_true, instances, router_argv
from tests.fixtures.processes import ServiceProcess, ServiceProcessFactory
from tokenyard.common.discovery import Instance

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
STREAMS = 30
AFTER = 10
MAX_TOKENS = 24


async def _sample(session: aiohttp.ClientSession, address: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` with ``labels`` on a service's /metrics (0 when absent)."""
    async with session.get(f"http://{address}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def _complete(client: openai.AsyncOpenAI, i: int) -> tuple[int, str]:
    """One streamed completion: (output tokens, finish reason)."""
    prompt = f"Request {i}: " + " ".join(f"word{(i * 31 + k) % 997}" for k in range(300))
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    tokens, finish = -1, ""
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, finish


@dataclass
class Split:
    """A split deployment: prefill workers whose KV hand-off is slow on purpose, one decode worker,
    a KV router and a frontend that always disaggregates, warmed up until a request was
    prefilled remotely."""

    prefill: list[ServiceProcess]
    frontend_proc: ServiceProcess
    router: Instance
    fe: str
    client: openai.AsyncOpenAI
    session: aiohttp.ClientSession

    async def sample(self, name: str, **labels: str) -> float:
        return await _sample(self.session, self.fe, name, **labels)

    async def wait_in_prefill(self, n: int) -> None:
        async def all_in_prefill() -> bool:
            active = await _sample(
                self.session,
                self.router.metrics_address,
                "tokenyard_router_pool_active_requests",
                pool="prefill",
            )
            return active >= n

        await eventually_true(all_in_prefill, f"{n} requests in the prefill stage", 20)

    async def gather(self, tasks: list[asyncio.Task[tuple[int, str]]]) -> list[tuple[int, str]]:
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, (
            f"{len(failures)} requests failed, first: {failures[0]!r}\n{self.frontend_proc.output()}"
        )
        return [r for r in results if not isinstance(r, BaseException)]


@contextlib.asynccontextmanager
async def split_deployment(
    spawn: ServiceProcessFactory, tmp_path: Path, prefill_workers: int
) -> AsyncIterator[Split]:
    url = f"dir://{tmp_path / 'discovery'}"
    common = ["--port", "0", "--metrics-port", "0", "--discovery", url, "--discovery-ttl", "3"]
    mocker = ["--mocker-speedup-ratio", "1", "--mocker-block-size", "16"]
    # The hand-off of a ~1000-token prompt at 128 KiB per token (an 8B model's KV) over 0.05 GB/s
    # takes about 2.7 s: every request is still in its prefill stage when a worker dies.
    slow_handoff = ["--mocker-kv-bytes-per-token", "131072", "--mocker-kv-transfer-bandwidth-gbps", "0.05"]
    prefill = [
        spawn(["worker", *common, "--role", "prefill", *mocker, *slow_handoff])
        for _ in range(prefill_workers)
    ]
    decode_proc = spawn(["worker", *common, "--role", "decode", *mocker])
    router_proc = spawn(router_argv(url, "--mode", "kv"))
    frontend_proc = spawn(
        ["frontend", "--port", "0", "--http-port", "0", "--discovery", url, "--disagg-policy", "always"]
    )
    procs = [*prefill, decode_proc, router_proc, frontend_proc]
    await instances(url, "worker", prefill_workers + 1, procs)
    router: Instance = (await instances(url, "router", 1, procs))[0]
    frontend: Instance = (await instances(url, "frontend", 1, procs))[0]
    fe = frontend.metrics_address
    client = openai.AsyncOpenAI(base_url=f"http://{fe}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            split = Split(prefill, frontend_proc, router, fe, client, session)

            async def prefilled_remotely() -> bool:
                try:
                    await client.completions.create(model=MODEL, prompt="warm up", max_tokens=1)
                except openai.APIError:
                    return False
                return await split.sample("tokenyard_frontend_disagg_prefill_seconds_count") > 0

            await eventually_true(prefilled_remotely, "a request is prefilled remotely", 60)
            yield split
    finally:
        await client.close()


async def test_killing_the_prefill_worker_loses_no_request(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    async with split_deployment(spawn, tmp_path, 1) as split:
        tasks = [asyncio.create_task(_complete(split.client, i)) for i in range(STREAMS)]
        await split.wait_in_prefill(STREAMS)
        split.prefill[0].kill()
        # Sent while the dead worker is still in discovery: routed to it, refused, prefilled locally.
        tasks += [asyncio.create_task(_complete(split.client, STREAMS + i)) for i in range(AFTER)]
        assert await split.gather(tasks) == [(MAX_TOKENS, "length")] * (STREAMS + AFTER)
        fallbacks = await split.sample("tokenyard_frontend_disagg_prefill_failures_total")
        print(f"{fallbacks:.0f} prefill stages failed over to the decode worker")
        assert fallbacks >= STREAMS
        # No other prefill worker to retry on.
        assert await split.sample("tokenyard_frontend_disagg_prefill_retries_total") == 0

        async def router_idle() -> bool:
            return (
                await _sample(split.session, split.router.metrics_address, "tokenyard_router_active_requests")
                == 0
            )

        # Both stages of every request were notified (or dropped with the dead worker): nothing leaks.
        await eventually_true(router_idle, "the router tracks no request", 15)


async def test_a_dead_prefill_worker_s_requests_are_prefilled_by_another(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    async with split_deployment(spawn, tmp_path, 2) as split:
        before = await split.sample("tokenyard_frontend_disagg_prefill_seconds_count")
        streams = 16
        tasks = [asyncio.create_task(_complete(split.client, i)) for i in range(streams)]
        await split.wait_in_prefill(streams)
        split.prefill[0].kill()
        assert await split.gather(tasks) == [(MAX_TOKENS, "length")] * streams
        retried = await split.sample("tokenyard_frontend_disagg_prefill_retries_total")
        lost = await split.sample("tokenyard_frontend_disagg_prefill_failures_total")
        handed_off = await split.sample("tokenyard_frontend_disagg_prefill_seconds_count") - before
        print(f"{retried:.0f} prefill stages moved to the other prefill worker")
        # The dead worker's requests moved to the live prefill worker, none to their decode worker.
        assert retried >= 1 and lost == retried
        assert handed_off == streams
