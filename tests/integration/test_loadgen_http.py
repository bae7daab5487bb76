"""The load generator against a small fake OpenAI streaming server on 127.0.0.1.

The fake stands in for the server only: it streams SSE the way OpenAI-compatible servers do
(optionally splitting events across writes), reports usage with cached tokens from a naive
prefix cache, and fails every Nth request on demand. Everything on the client side is real.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench.loadgen.cli import run_cli

pytestmark = pytest.mark.integration

CACHE_BLOCK = 16


@dataclass
class FakeOpenAI:
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.001
    fail_every: int = 0
    split_writes: bool = True
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    on_request: Callable[[], Awaitable[None]] | None = None
    _seen: list[list[str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def _cached(self, units: list[str]) -> int:
        """Longest prefix shared with an earlier prompt, in whole cache blocks."""
        best = 0
        for seen in self._seen:
            n = 0
            for a, b in zip(seen, units, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        self._seen.append(units)
        return best // CACHE_BLOCK * CACHE_BLOCK

    async def _send(self, resp: web.StreamResponse, payload: dict[str, Any] | str) -> None:
        data = ("data: " + (payload if isinstance(payload, str) else json.dumps(payload)) + "\n\n").encode()
        if self.split_writes:
            # Halves written separately so that reads can end inside an event.
            await resp.write(data[: len(data) // 2])
            await resp.write(data[len(data) // 2 :])
        else:
            await resp.write(data)

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.perf_counter())
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.on_request is not None:
            await self.on_request()
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        chat = request.path.endswith("/chat/completions")
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        units = [str(t) for t in prompt] if isinstance(prompt, list) else prompt.split()
        cached = self._cached(units)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            if chat:
                await self._send(
                    resp, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                )
            await asyncio.sleep(self.first_token_delay_s)
            n = int(body["max_tokens"])
            for i in range(n):
                last = i == n - 1
                choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
                if chat:
                    choice["delta"] = {"content": f" t{i}"}
                else:
                    choice["text"] = f" t{i}"
                await self._send(resp, {"choices": [choice]})
                if not last:
                    await asyncio.sleep(self.token_delay_s)
            usage = {
                "prompt_tokens": len(units),
                "completion_tokens": n,
                "total_tokens": len(units) + n,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            await self._send(resp, {"choices": [], "usage": usage})
            await self._send(resp, "[DONE]")
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1


async def _serve(fake: FakeOpenAI) -> AsyncIterator[str]:
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
async def target(fake: FakeOpenAI) -> AsyncIterator[str]:
    async for url in _serve(fake):
        yield url


async def _run(tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "results.json"
    rc = await run_cli([*argv, "--output", str(out), "--progress", "off"])
    return rc, json.loads(out.read_text())


async def test_fixed_concurrency_sends_the_count_caps_in_flight_and_reads_usage(
    fake: FakeOpenAI, target: str, tmp_path: Path
) -> None:
    fake.first_token_delay_s = 0.02
    rc, doc = await _run(
        tmp_path, "--target", target, "--concurrency", "4", "--num-requests", "20",
        "--num-prefixes", "1", "--prefix-len", "64", "--suffix-len", "16", "--output-len", "5",
        "--prompt-format", "tokens", "--save-requests",
    )  # fmt: skip
    assert rc == 0
    (run,) = doc["runs"]
    s = run["summary"]
    assert s["requests_ok"] == 20 and s["requests_failed"] == 0 and len(fake.bodies) == 20
    assert fake.max_in_flight <= 4
    body = fake.bodies[0]
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and body["ignore_eos"] is True and body["min_tokens"] == 5
    assert all(isinstance(b["prompt"], list) and len(b["prompt"]) == 80 for b in fake.bodies)
    # One shared 64-token prefix: every request after the first finds it cached.
    assert s["prompt_tokens"] == 20 * 80 and s["output_tokens"] == 20 * 5
    assert s["cached_tokens"] == 19 * 64
    assert s["cache_hit_rate"] == pytest.approx(19 * 64 / (20 * 80))
    assert s["ttft_ms"]["count"] == 20 and s["ttft_ms"]["min"] >= 20.0
    assert s["itl_ms"]["count"] == 20 * 4
    for r in run["requests"]:
        assert r["ttft_s"] <= r["latency_s"]
        assert sum(r["itl_s"]) <= r["latency_s"] - r["ttft_s"]
        assert r["content_chunks"] == 5 and r["completion_tokens"] == 5 and r["finish_reason"] == "length"
    assert s["request_throughput"] > 0 and s["output_token_throughput"] == pytest.approx(
        s["request_throughput"] * 5
    )


async def test_rate_mode_sends_text_prompts_and_counts_errors_by_status(
    fake: FakeOpenAI, target: str, tmp_path: Path
) -> None:
    fake.fail_every = 4
    rc, doc = await _run(
        tmp_path, "--target", target, "--rate", "200", "--arrival", "constant", "--num-requests", "12",
        "--num-prefixes", "2", "--prefix-len", "32", "--suffix-len", "8", "--output-len", "3",
    )  # fmt: skip
    assert rc == 0
    s = doc["runs"][0]["summary"]
    assert len(fake.bodies) == 12
    assert s["requests_sent"] == 12 and s["requests_ok"] == 9 and s["requests_failed"] == 3
    assert s["errors"] == {"http_429": 3}
    assert "slow down" in s["error_samples"]["http_429"]
    assert all(isinstance(b["prompt"], str) and len(b["prompt"].split()) == 40 for b in fake.bodies)
    assert doc["runs"][0]["config"]["load"] == "constant 200 req/s"


async def test_duration_bound_stops_sending_and_awaits_requests_in_flight(
    fake: FakeOpenAI, target: str, tmp_path: Path
) -> None:
    rc, doc = await _run(
        tmp_path, "--target", target, "--concurrency", "2", "--duration", "0.3", "--output-len", "4",
        "--prefix-len", "8", "--suffix-len", "8",
    )  # fmt: skip
    assert rc == 0
    s = doc["runs"][0]["summary"]
    assert s["requests_sent"] >= 1
    assert s["requests_ok"] == s["requests_sent"] == len(fake.bodies)


async def test_warmup_requests_are_sent_but_not_measured(
    fake: FakeOpenAI, target: str, tmp_path: Path
) -> None:
    rc, doc = await _run(
        tmp_path, "--target", target, "--concurrency", "2", "--num-requests", "5", "--warmup", "3",
        "--output-len", "2", "--prefix-len", "8", "--suffix-len", "8",
    )  # fmt: skip
    assert rc == 0
    assert len(fake.bodies) == 8
    assert doc["runs"][0]["summary"]["requests_sent"] == 5


async def test_chat_ttft_waits_for_content_not_the_role_chunk(
    fake: FakeOpenAI, target: str, tmp_path: Path
) -> None:
    fake.first_token_delay_s = 0.05
    rc, doc = await _run(
        tmp_path, "--target", target, "--endpoint", "chat", "--concurrency", "2", "--num-requests", "4",
        "--output-len", "3", "--prefix-len", "8", "--suffix-len", "8", "--save-requests",
    )  # fmt: skip
    assert rc == 0
    assert all("messages" in b and "prompt" not in b for b in fake.bodies)
    for r in doc["runs"][0]["requests"]:
        assert r["ttft_s"] >= 0.05
        assert r["content_chunks"] == 3


async def test_trace_replay_sends_the_trace_lengths(fake: FakeOpenAI, target: str, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 40, "output_length": 2, "hash_ids": [0, 1, 2]},
        {"timestamp": 30, "input_length": 32, "output_length": 3, "hash_ids": [0, 1]},
        {"timestamp": 60, "input_length": 50, "output_length": 1, "hash_ids": [0, 1, 5, 6]},
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, doc = await _run(
        tmp_path, "--target", target, "--trace", str(trace), "--block-size", "16", "--fixed-schedule",
        "--speedup", "2", "--prompt-format", "tokens",
    )  # fmt: skip
    assert rc == 0
    assert [len(b["prompt"]) for b in fake.bodies] == [40, 32, 50]
    assert [b["max_tokens"] for b in fake.bodies] == [2, 3, 1]
    # hash_ids 0 and 1 are the same two blocks in every row.
    assert fake.bodies[0]["prompt"][:32] == fake.bodies[1]["prompt"] == fake.bodies[2]["prompt"][:32]
    assert fake.bodies[0]["prompt"][32:40] != fake.bodies[2]["prompt"][32:40]
    s = doc["runs"][0]["summary"]
    assert s["requests_ok"] == 3 and s["cached_tokens"] == 32 + 32
    assert doc["runs"][0]["config"]["load"] == "fixed schedule x2"


async def test_two_targets_run_as_a_b_with_ratios_and_commands(
    fake: FakeOpenAI, target: str, tmp_path: Path
) -> None:
    other = FakeOpenAI(first_token_delay_s=0.01)
    log = tmp_path / "commands.log"
    async for target_b in _serve(other):
        rc, doc = await _run(
            tmp_path, "--target", target, "--target", target_b, "--labels", "base,new",
            "--concurrency", "2", "--num-requests", "6", "--output-len", "3", "--prefix-len", "8",
            "--suffix-len", "8", "--ab-rounds", "2",
            "--setup-a", f"echo setup-a >> {log}", "--teardown-a", f"echo teardown-a >> {log}",
            "--setup-b", f"echo setup-b >> {log}", "--teardown-b", f"echo teardown-b >> {log}",
        )  # fmt: skip
    assert rc == 0
    assert log.read_text().split() == ["setup-a", "teardown-a", "setup-b", "teardown-b"] * 2
    assert len(fake.bodies) == len(other.bodies) == 12
    # Both configurations got the same prompts, so the comparison is of servers, not of workloads.
    assert sorted(b["prompt"] for b in fake.bodies) == sorted(b["prompt"] for b in other.bodies)
    # A second round goes on with new requests instead of replaying the first round's.
    assert not {b["prompt"] for b in fake.bodies[:6]} & {b["prompt"] for b in fake.bodies[6:]}
    base, new = doc["runs"]
    assert (base["label"], new["label"]) == ("base", "new")
    assert base["summary"]["requests_ok"] == new["summary"]["requests_ok"] == 12
    metrics = doc["comparison"]["metrics"]
    ttft = metrics["TTFT p50 (ms)"]
    assert ttft["new/base"] == pytest.approx(ttft["new"] / ttft["base"])
    assert metrics["requests ok"] == {"base": 12.0, "new": 12.0, "new/base": 1.0}


async def test_ab_configuration_strings_override_the_base_flags(
    fake: FakeOpenAI, target: str, tmp_path: Path
) -> None:
    rc, doc = await _run(
        tmp_path, "--target", target, "--num-requests", "3", "--output-len", "2", "--prefix-len", "8",
        "--suffix-len", "8", "--header", "x-common: 1",
        "--ab", "--header 'x-route: kv' --concurrency 1", "--header 'x-route: random' --rate 100 --output-len 4",
    )  # fmt: skip
    assert rc == 0
    assert [h.get("x-route") for h in fake.headers] == ["kv"] * 3 + ["random"] * 3
    assert all(h.get("x-common") == "1" for h in fake.headers)
    assert [b["max_tokens"] for b in fake.bodies] == [2] * 3 + [4] * 3
    a, b = doc["runs"]
    assert a["config"]["load"] == "concurrency 1" and b["config"]["load"] == "poisson 100 req/s"


async def test_server_cpu_is_accounted_by_command_line_pattern(
    fake: FakeOpenAI, target: str, tmp_path: Path
) -> None:
    marker = f"loadgen-cpu-burner-{os.getpid()}"
    # Burns 0.1 s of its own CPU time when told to, says so, then idles until killed.
    code = (
        "import sys, time\n"
        "sys.stdin.readline()\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.1: pass\n"
        "print('burnt', flush=True)\n"
        "time.sleep(60)\n"
    )
    burner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, marker, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert burner.stdin is not None and burner.stdout is not None
    stdin, stdout = burner.stdin, burner.stdout

    async def burn_once() -> None:
        # The first request makes the burn happen between the CPU meter's two readings.
        if len(fake.bodies) == 1:
            stdin.write(b"go\n")
            await stdin.drain()
            assert await stdout.readline() == b"burnt\n"

    fake.on_request = burn_once
    try:
        rc, doc = await _run(
            tmp_path, "--target", target, "--concurrency", "1", "--num-requests", "2", "--output-len", "2",
            "--prefix-len", "8", "--suffix-len", "8", "--measure-cpu-of", marker,
        )  # fmt: skip
    finally:
        burner.kill()
        await burner.wait()
    assert rc == 0
    cpu = doc["runs"][0]["cpu"]
    assert [p["pid"] for p in cpu["processes"]] == [burner.pid]
    # /proc counts whole clock ticks: allow one tick (10 ms) of truncation.
    assert cpu["seconds"] >= 0.09
    assert cpu["ms_per_request"] == pytest.approx(cpu["seconds"] * 1000 / 2)
