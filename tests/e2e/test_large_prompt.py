"""A 30 MB prompt does not stall the other requests of its frontend, nor blow up its memory.

Real processes: a router, a mocker worker in real time, a frontend. Sixteen streams of small
requests measure their time to first token alone, then again while a 30 MB prompt goes through the
same frontend (tokenized in the frontend's pool, then refused: it is longer than the context). The
bounds are generous (timing goals live in bench/): the small requests' TTFT p99 with the large
prompt stays within a few times its value without it, where tokenizing on the event loop held every
request for tens of seconds; and the frontend's peak RSS stays under 1 GB.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.fixtures.processes import ServiceProcess, wait_for_instance

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
STREAMS = 16
LARGE_PROMPT_BYTES = 30_000_000
_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
]


def _argv(discovery: str, *extra: str) -> list[str]:
    return ["--port", "0", "--metrics-port", "0", "--discovery", discovery, *extra]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServiceProcess]]:
    root = tmp_path_factory.mktemp("large-prompt")
    discovery = f"dir://{root / 'discovery'}"
    procs = [
        ServiceProcess(["router", *_argv(discovery)], root / "router.log"),
        ServiceProcess(["worker", *_argv(discovery, "--mocker-speedup-ratio", "1")], root / "worker.log"),
        ServiceProcess(
            ["frontend", "--port", "0", "--http-port", "0", "--discovery", discovery], root / "frontend.log"
        ),
    ]
    try:
        asyncio.run(wait_for_instance(discovery, "router", proc=procs[0]))
        asyncio.run(wait_for_instance(discovery, "worker", proc=procs[1]))
        frontend = asyncio.run(wait_for_instance(discovery, "frontend", proc=procs[2]))
        url = f"http://{frontend.metrics_address}"
        asyncio.run(_wait_ready(url))
        yield url, procs[2]
    finally:
        for proc in procs:
            proc.close()


async def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(url + "/v1/completions", json=_small("probe")) as r:
                    if r.status == 200:
                        await r.read()
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("the deployment never served a request")


def _small(prompt: str) -> dict[str, object]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True}


async def _stream_once(session: aiohttp.ClientSession, url: str, prompt: str) -> float:
    """TTFT of one small streamed request, in seconds."""
    sent = time.perf_counter()
    async with session.post(url + "/v1/completions", json=_small(prompt)) as r:
        assert r.status == 200, await r.text()
        first: float | None = None
        async for line in r.content:
            if first is None and line.startswith(b"data: {") and b'"text":"' in line:
                first = time.perf_counter() - sent
        assert first is not None, "no content"
        return first


async def _small_streams(url: str, seconds: float, tag: str) -> list[float]:
    ttfts: list[float] = []
    until = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:

        async def one_stream(i: int) -> None:
            n = 0
            while time.monotonic() < until:
                ttfts.append(await _stream_once(session, url, f"{tag} stream {i} request {n} says hello"))
                n += 1

        await asyncio.gather(*(one_stream(i) for i in range(STREAMS)))
    return ttfts


def _large_prompt() -> str:
    words: list[str] = []
    size = 0
    rng = np.random.default_rng(0)
    for index in rng.integers(0, len(_WORDS), LARGE_PROMPT_BYTES // 4):
        word = _WORDS[index]
        words.append(word)
        size += len(word) + 1
        if size >= LARGE_PROMPT_BYTES:
            break
    return " ".join(words)


async def _with_large_prompt(url: str) -> tuple[list[float], int, str, float]:
    body = json.dumps({"model": MODEL, "prompt": _large_prompt(), "max_tokens": 8}).encode()
    assert len(body) >= LARGE_PROMPT_BYTES

    async def large() -> tuple[int, str, float]:
        started = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            headers = {"Content-Type": "application/json"}
            async with session.post(url + "/v1/completions", data=io.BytesIO(body), headers=headers) as r:
                return r.status, await r.text(), time.perf_counter() - started

    task = asyncio.create_task(large())
    ttfts: list[float] = []
    # Small requests stream for as long as the large prompt is in the frontend's hands.
    while not task.done():
        ttfts += await _small_streams(url, 2.0, "busy")
    status, text, took = await task
    return ttfts, status, text, took


def _peak_rss_bytes(proc: ServiceProcess) -> int:
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_30mb_prompt_neither_stalls_small_requests_nor_takes_a_gigabyte(
    deployment: tuple[str, ServiceProcess],
) -> None:
    url, frontend = deployment
    alone = asyncio.run(_small_streams(url, 5.0, "alone"))
    busy, status, text, took = asyncio.run(_with_large_prompt(url))
    p99_alone = float(np.percentile(alone, 99))
    p99_busy = float(np.percentile(busy, 99))
    peak = _peak_rss_bytes(frontend)
    print(
        f"\nsmall TTFT p99 alone {p99_alone * 1000:.1f} ms ({len(alone)} requests), with the 30 MB prompt "
        f"{p99_busy * 1000:.1f} ms ({len(busy)} requests); large prompt answered {status} in {took:.1f} s; "
        f"frontend peak RSS {peak / 2**20:.0f} MiB"
    )
    # Longer than the mocker's context: refused with a message, after tokenizing it.
    assert status == 400 and "context length" in text, text
    assert len(busy) >= STREAMS
    assert p99_busy < max(5 * p99_alone, p99_alone + 0.5), (p99_alone, p99_busy)
    assert peak < 2**30, f"frontend peak RSS {peak / 2**20:.0f} MiB"
