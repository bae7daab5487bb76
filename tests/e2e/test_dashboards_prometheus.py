"""Every panel of the Grafana dashboards returns data from a real Prometheus.

A `tokenyard up --engine mocker` deployment runs under load, joined by three workers started here:
a prefill and a decode worker of a second model (so that the frontend splits its requests) and an
aggregated worker that is killed mid-stream (so that requests migrate). Some requests are invalid,
some exceed the frontend's in-flight limit, and one Route names a model nobody serves, so that the
error and refusal panels have something to show. A real Prometheus (Debian's `prometheus`,
installed when missing, as the Redis fixture does) scrapes every instance in discovery each second;
then each target of each panel is asked for over the load's window and must return a finite value.

Metrics that a panel shows but that no service exports yet are listed in PENDING with the reason;
the test fails when one of them starts returning data, so the list cannot go stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from tests.fixtures.http import frontend_serves
from tests.fixtures.processes import ServiceProcess, ServiceProcessFactory, wait_for_instance
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.common.discovery import open_discovery

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
MODEL = "SmolLM2-135M-Instruct"
SPLIT_MODEL = "split-demo"
LOAD_SECONDS = 40.0
# Grafana's variables, as the dashboards use them.
VARIABLES = {"$__rate_interval": "10s", "${model}": ".*", "$model": ".*"}
# Metric families a panel shows that no running service exports yet: name -> why.
PENDING: dict[str, str] = {}
# Targets whose only honest value in this deployment is zero: (panel, family) -> why. Every other
# target must show a value above zero at least once.
_MOCKER_CARRIES_NO_KV = (
    "mocker workers simulate a KV transfer's time but carry no blocks: only the CPU engine moves "
    "(and counts) them"
)
ZERO_OK: dict[tuple[str, str], str] = {
    ("KV transfer", "tokenyard_worker_kv_transfer_blocks_total"): _MOCKER_CARRIES_NO_KV,
    ("KV transfer", "tokenyard_worker_kv_transfer_fallbacks_total"): _MOCKER_CARRIES_NO_KV,
    ("KV transfer bytes", "tokenyard_worker_kv_transfer_bytes_total"): _MOCKER_CARRIES_NO_KV,
}


@dataclass(frozen=True)
class Target:
    dashboard: str
    panel: str
    expr: str

    def query(self) -> str:
        expr = self.expr
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        return expr

    def families(self) -> set[str]:
        return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\btokenyard_\w+", self.expr)}


def dashboard_targets() -> list[Target]:
    targets = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                targets.append(Target(path.name, panel["title"], target["expr"]))
    assert targets
    return targets


# --- processes ----------------------------------------------------------------------------------


def free_ports(count: int, consecutive: int = 1) -> list[int]:
    """``count`` free loopback ports, each followed by ``consecutive - 1`` free ones."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            taken = set(found) | {p + i for p in found for i in range(consecutive)}
            block = range(port, port + consecutive)
            if taken & set(block) or port + consecutive > 65535:
                continue
            sockets = []
            try:
                for p in block[1:]:
                    s = socket.socket()
                    sockets.append(s)
                    s.bind(("127.0.0.1", p))
            except OSError:
                continue
            finally:
                for s in sockets:
                    s.close()
            found.append(port)
    return found


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Path of ``prometheus``, installed from Debian's packages when missing and running as root."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("prometheus is not on PATH; install it (apt-get install prometheus) to run this test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = shutil.which("prometheus")
    if not found:
        pytest.fail("installed the prometheus package but prometheus is still not on PATH")
    return found


class Prometheus:
    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        self.port = free_ports(1)[0]
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "5s"},
            "scrape_configs": [{"job_name": "tokenyard", "static_configs": [{"targets": targets}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log_path.read_text(errors='replace')}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready:\n{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def prometheus_factory(prometheus_binary: str, tmp_path: Path) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    yield started
    for prom in started:
        prom.stop()


# --- load ---------------------------------------------------------------------------------------

SYSTEM = "You are a terse assistant for the harbour office. " * 8


async def completion(session: aiohttp.ClientSession, http: str, body: dict[str, Any]) -> int:
    try:
        async with session.post(f"{http}/v1/completions", json=body) as response:
            if body.get("stream"):
                async for _ in response.content:
                    pass
            else:
                await response.read()
            return response.status
    except (TimeoutError, aiohttp.ClientError):
        return 0


async def load(http: str, until: float, statuses: list[int]) -> None:
    rng = random.Random(17)
    timeout = aiohttp.ClientTimeout(total=60)

    async def aggregated_loop(i: int) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            n = 0
            while time.monotonic() < until:
                n += 1
                # A shared prefix (KV hits) and a distinct tail.
                prompt = f"{SYSTEM} Question {i}-{n}: how deep is berth {rng.randint(1, 40)}?"
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "stream": n % 2 == 0}
                statuses.append(await completion(session, http, body))

    async def split_loop(i: int) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            n = 0
            while time.monotonic() < until:
                n += 1
                # Long and unshared: worth a remote prefill under the default policy.
                crates = " ".join(f"crate{rng.randint(0, 10**6)}" for _ in range(700))
                prompt = f"Shipment {i}-{n} manifest: {crates}"
                body = {"model": SPLIT_MODEL, "prompt": prompt, "max_tokens": 16, "stream": True}
                statuses.append(await completion(session, http, body))

    async def invalid_loop() -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < until:
                body = {"model": MODEL, "prompt": "bad", "max_tokens": -3}
                statuses.append(await completion(session, http, body))
                await asyncio.sleep(0.5)

    async def burst_loop() -> None:
        # Past the frontend's in-flight limit: some of these are refused (frontend_limit).
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < until:
                body = {"model": MODEL, "prompt": f"{SYSTEM} burst", "max_tokens": 8}
                statuses.extend(await asyncio.gather(*(completion(session, http, body) for _ in range(12))))
                await asyncio.sleep(3)

    await asyncio.gather(
        *(aggregated_loop(i) for i in range(8)),
        *(split_loop(i) for i in range(3)),
        invalid_loop(),
        burst_loop(),
    )


async def worker_active_requests(metrics_address: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://{metrics_address}/metrics") as r:
        text = await r.text()
    match = re.search(r"^tokenyard_worker_active_requests (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def kill_when_busy(proc: ServiceProcess, metrics_address: str, after: float, until: float) -> None:
    """SIGKILL the worker once it streams something, no sooner than ``after``."""
    await asyncio.sleep(after)
    while time.monotonic() < until:
        if await worker_active_requests(metrics_address) >= 1:
            break
        await asyncio.sleep(0.1)
    proc.proc.send_signal(signal.SIGKILL)


async def refused_routes(router_address: str, until: float) -> None:
    """Routes for a model nobody serves, every other second: the router refuses them (unavailable)."""
    async with grpc.aio.insecure_channel(router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        i = 0
        while time.monotonic() < until:
            i += 1
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Route(
                    router_pb2.RouteRequest(request_id=f"nobody-{i}", model="no-such-model", isl_tokens=4),
                    timeout=5,
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(2)


# --- the test -----------------------------------------------------------------------------------


async def test_every_dashboard_panel_returns_data_under_load(
    spawn: ServiceProcessFactory, prometheus_factory: list[Prometheus], prometheus_binary: str, tmp_path: Path
) -> None:
    targets = dashboard_targets()
    url = f"dir://{tmp_path / 'discovery'}"
    http_port, grpc_port, gms_metrics, prom_dir = (*free_ports(3), tmp_path / "prometheus")
    router_port, planner_port = free_ports(2, consecutive=2)
    worker_port, worker_metrics = free_ports(2, consecutive=2)
    extra_ports = free_ports(6)
    env = {
        # Low enough that the burst loop crosses it.
        "TOKENYARD_FRONTEND_MAX_INFLIGHT_REQUESTS": "16",
        # Planner ticks within the test's window.
        "TOKENYARD_PLANNER_THROUGHPUT__INTERVAL": "5",
        "TOKENYARD_PLANNER_LOAD__INTERVAL": "2",
    }
    # fmt: off
    up = spawn(
        [
            "up", "--engine", "mocker", "--workers", "2", "--discovery", url,
            "--state-dir", str(tmp_path / "state"), "--grace-period", "3",
            "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--router-port", str(router_port), "--planner-port", str(planner_port),
            "--gms-metrics-port", str(gms_metrics),
            "--worker-port", str(worker_port), "--worker-metrics-port", str(worker_metrics),
        ],
        env=env,
    )
    # fmt: on
    frontend = await wait_for_instance(url, "frontend", timeout=180, proc=up)

    def worker(port: int, metrics_port: int, *flags: str) -> ServiceProcess:
        ports = ["--port", str(port), "--metrics-port", str(metrics_port)]
        return spawn(["worker", "--discovery", url, "--engine", "mocker", *ports, *flags])

    prefill = worker(extra_ports[0], extra_ports[1], "--role", "prefill", "--model", SPLIT_MODEL)
    decode = worker(extra_ports[2], extra_ports[3], "--role", "decode", "--model", SPLIT_MODEL)
    # Slower than the others, so that it holds streams when it dies.
    doomed = worker(extra_ports[4], extra_ports[5], "--model", MODEL, "--mocker-speedup-ratio", "0.1")
    http = f"http://{frontend.metrics_address}"
    async with aiohttp.ClientSession() as session:
        for model in (MODEL, SPLIT_MODEL):
            for _ in range(300):
                if await frontend_serves(session, http, model):
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"the frontend never served {model}:\n{up.output()[-3000:]}")
    for proc in (prefill, decode, doomed):
        assert proc.proc.poll() is None, proc.output()

    discovery = open_discovery(url)
    try:
        instances = await discovery.instances()
    finally:
        await discovery.close()
    scraped = sorted({i.metrics_address for i in instances if i.metrics_address})
    doomed_metrics = f"127.0.0.1:{extra_ports[5]}"
    assert doomed_metrics in scraped and len(scraped) >= 8, scraped
    router_address = next(i.address for i in instances if i.service == "router")

    prom_dir.mkdir()
    prom = Prometheus(prometheus_binary, prom_dir, scraped)
    prometheus_factory.append(prom)
    await asyncio.to_thread(prom.wait_ready)

    start = time.time()
    until = time.monotonic() + LOAD_SECONDS
    statuses: list[int] = []
    await asyncio.gather(
        load(http, until, statuses),
        kill_when_busy(doomed, doomed_metrics, 10.0, until),
        refused_routes(router_address, until),
    )
    # Two more scrapes of the final state.
    await asyncio.sleep(3)
    end = time.time()
    assert statuses.count(200) > 100, f"too few successful requests: {sorted(set(statuses))}"
    assert any(s >= 400 for s in statuses), "no request failed: the error panels would be empty"

    failures: list[str] = []
    pending_seen: dict[str, list[str]] = {}
    for target in targets:
        reply = await asyncio.to_thread(
            prom.get, "/api/v1/query_range", query=target.query(), start=str(start), end=str(end), step="1"
        )
        assert reply["status"] == "success", (target, reply)
        finite = [
            float(v)
            for series in reply["data"]["result"]
            for _, v in series["values"]
            if math.isfinite(float(v))
        ]
        if finite:
            for family in target.families() & set(PENDING):
                failures.append(f"{family} is listed in PENDING but returns data now: remove it")
            zero_ok = {(target.panel, f) for f in target.families()} & set(ZERO_OK)
            if max(finite) > 0 and zero_ok:
                failures.append(
                    f"{sorted(zero_ok)} is listed in ZERO_OK but shows values above zero: remove it"
                )
            elif max(finite) <= 0 and not zero_ok:
                failures.append(f"{target.dashboard} / {target.panel}: only zeros for {target.query()}")
            continue
        missing = {
            family
            for family in target.families()
            if not (await asyncio.to_thread(prom.get, "/api/v1/series", **{"match[]": family}))["data"]
        }
        if missing and missing <= set(PENDING):
            for family in missing:
                pending_seen.setdefault(family, []).append(target.panel)
            continue
        failures.append(
            f"{target.dashboard} / {target.panel}: no data for {target.query()}"
            + (f" (never exported: {sorted(missing)})" if missing else "")
        )
    assert not failures, "\n".join(failures) + f"\n\nup log tail:\n{up.output()[-2000:]}"
    for family, panels in pending_seen.items():
        print(f"pending: {family} ({PENDING[family]}); panels {sorted(set(panels))}")


def test_the_compose_prometheus_config_passes_promtool(prometheus_binary: str) -> None:
    promtool = Path(prometheus_binary).with_name("promtool")
    done = subprocess.run(
        [str(promtool), "check", "config", "--syntax-only", str(ROOT / "docker" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
