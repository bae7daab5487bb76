"""The planner with the local connector in a `tokenyard up --engine mocker` deployment: a burst
of requests makes it start workers, the quiet after it makes it drain and stop them; every
tick's record is served over gRPC."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from bench.loadgen.client import Endpoint, RequestRecord, open_session, stream_request
from bench.loadgen.runner import LoadShape, run_load
from bench.loadgen.workload import RequestSpec, SharedPrefixWorkload
from tests.e2e.test_up import _free_block
from tokenyard.api.planner.v1 import planner_pb2, planner_pb2_grpc
from tokenyard.common.discovery import open_discovery

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "bench" / "traces" / "planner_burst_profile.json"
ENV = {
    "PYTHONUNBUFFERED": "1",
    "TOKENYARD_WORKER_MOCKER__NUM_GPU_BLOCKS": "256",
    "TOKENYARD_WORKER_MOCKER__BLOCK_SIZE": "16",
    "TOKENYARD_WORKER_MOCKER__MAX_NUM_SEQS": "16",
    "TOKENYARD_WORKER_MOCKER__SPEEDUP_RATIO": "0.2",
    "TOKENYARD_PLANNER_CONNECTOR": "local",
    "TOKENYARD_PLANNER_PROFILE": str(PROFILE),
    "TOKENYARD_PLANNER_SLA__TTFT_MS": "1000",
    "TOKENYARD_PLANNER_SLA__ITL_MS": "200",
    "TOKENYARD_PLANNER_THROUGHPUT__INTERVAL": "4",
    "TOKENYARD_PLANNER_THROUGHPUT__PREDICTOR": "constant",
    "TOKENYARD_PLANNER_LOAD__INTERVAL": "1",
    "TOKENYARD_PLANNER_LOCAL__MAX_WORKERS": "2",
    "TOKENYARD_PLANNER_LOCAL__DRAIN_GRACE": "5",
}


async def workers(discovery: str) -> int:
    d = open_discovery(discovery)
    try:
        return len(await d.instances("worker"))
    finally:
        await d.close()


async def burst(http_port: int, seconds: float) -> list[RequestRecord]:
    workload = SharedPrefixWorkload(num_prefixes=64, prefix_len=128, suffix_len=128, output_len=24)
    async with open_session(0, 120.0) as session:
        endpoint = Endpoint(
            url=f"http://127.0.0.1:{http_port}/v1/completions",
            api="completions",
            model="SmolLM2-135M-Instruct",
            prompt_format="tokens",
        )

        async def send(spec: RequestSpec) -> RequestRecord:
            return await stream_request(session, endpoint, spec)

        result = await run_load(send, workload, LoadShape(rate=6.0, arrival="constant", duration_s=seconds))
    return result.records


@pytest.mark.timeout(420)
async def test_the_planner_scales_a_mocker_deployment_up_and_down(tmp_path: Path) -> None:
    base = _free_block(200)
    discovery = f"dir://{tmp_path / 'discovery'}"
    argv = [
        sys.executable, "-m", "tokenyard.cli", "up", "--engine", "mocker", "--workers", "1",
        "--discovery", discovery, "--state-dir", str(tmp_path / "state"),
        "--http-port", str(base), "--grpc-port", str(base + 1), "--router-port", str(base + 2),
        "--planner-port", str(base + 4), "--gms-metrics-port", str(base + 6),
        "--worker-port", str(base + 7), "--worker-metrics-port", str(base + 100), "--grace-period", "5",
    ]  # fmt: skip
    log_path = tmp_path / "up.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
    try:
        deadline = time.monotonic() + 180
        while "tokenyard is up" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            await asyncio.sleep(0.3)
        assert await workers(discovery) == 1

        records = await burst(base, 40.0)
        assert sum(r.ok for r in records) >= 0.95 * len(records)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{base + 4}") as channel:
            stub = planner_pb2_grpc.PlannerServiceStub(channel)
            listed = await stub.ListDecisions(planner_pb2.ListDecisionsRequest())
            ups = [
                p for r in listed.records for p in r.pools
                if p.desired_replicas > p.current_replicas and p.state == planner_pb2.DECISION_STATE_APPLIED
            ]  # fmt: skip
            assert ups, log_path.read_text()[-4000:]
            ids = [r.decision_id for r in listed.records]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)

            # Quiet: the planner drains and stops what it started, back to the one `up` started.
            deadline = time.monotonic() + 120
            while await workers(discovery) > 1:
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                await asyncio.sleep(1.0)
            status = await stub.GetStatus(planner_pb2.GetStatusRequest())
            assert status.connector == "local" and status.perf_model_ready and not status.advisory
        text = log_path.read_text()
        assert "started aggregated worker planner-aggregated-1" in text
        assert "stopped aggregated worker planner-aggregated-" in text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log_path.read_text()[-3000:]
        assert await workers(discovery) == 0
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
