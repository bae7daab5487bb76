"""``tokenyard up --prefill-workers 1 --decode-workers 1``: a split deployment on loopback serves
through the frontend, each request prefilled on the prefill worker and decoded on the decode one."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.processes import run_to_exit

pytestmark = pytest.mark.e2e


def _free_block(size: int) -> int:
    """A base port such that base .. base+size-1 are all free right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - size)
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.loads(response.read()))


def _remote_decisions(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tokenyard_frontend_disagg_decisions_total{") and 'decision="remote"' in line
    )


def test_up_starts_a_split_deployment_that_disaggregates(tmp_path: Path) -> None:
    base = _free_block(12)
    discovery = f"dir://{tmp_path / 'discovery'}"
    argv = [
        sys.executable, "-m", "tokenyard.cli", "up", "--engine", "mocker",
        "--prefill-workers", "1", "--decode-workers", "1",
        "--discovery", discovery, "--state-dir", str(tmp_path / "state"),
        "--http-port", str(base), "--grpc-port", str(base + 1), "--router-port", str(base + 2),
        "--planner-port", str(base + 4), "--gms-metrics-port", str(base + 6),
        "--worker-port", str(base + 7), "--worker-metrics-port", str(base + 9), "--grace-period", "5",
    ]  # fmt: skip
    log_path = tmp_path / "up.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 120
        while "tokenyard is up" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert "1 prefill + 1 decode mocker worker(s)" in log_path.read_text()

        status = run_to_exit(["status", "--discovery", discovery, "--json-output"])
        rows = [json.loads(line) for line in status.stdout.splitlines()]
        roles = sorted(r["model_card"]["role"] for r in rows if r["service"] == "worker")
        assert roles == ["decode", "prefill"]

        http = f"http://127.0.0.1:{base}"
        # The frontend splits the model once its discovery feed saw both workers.
        deadline = time.monotonic() + 30
        while True:
            reply = _post(
                f"{http}/v1/completions", {"model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": 5}
            )
            if _remote_decisions(f"{http}/metrics") > 0:
                break
            assert time.monotonic() < deadline, "no request was prefilled remotely"
            time.sleep(0.2)
        usage = reply["usage"]
        assert isinstance(usage, dict) and usage["completion_tokens"] == 5

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
