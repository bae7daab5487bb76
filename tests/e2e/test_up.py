"""`tokenyard up` starts a whole deployment on loopback, `tokenyard status` sees it healthy,
and SIGTERM stops every process cleanly."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
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


def test_up_status_and_clean_stop(tmp_path: Path) -> None:
    base = _free_block(12)
    discovery = f"dir://{tmp_path / 'discovery'}"
    argv = [
        sys.executable,
        "-m",
        "tokenyard.cli",
        "up",
        "--engine",
        "mocker",
        "--workers",
        "2",
        "--discovery",
        discovery,
        "--state-dir",
        str(tmp_path / "state"),
        "--http-port",
        str(base),
        "--grpc-port",
        str(base + 1),
        "--router-port",
        str(base + 2),
        "--planner-port",
        str(base + 4),
        "--gms-metrics-port",
        str(base + 6),
        "--worker-port",
        str(base + 7),
        "--worker-metrics-port",
        str(base + 9),
        "--grace-period",
        "5",
    ]
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 120
        while "tokenyard is up" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)

        status = run_to_exit(["status", "--discovery", discovery, "--json-output"])
        assert status.returncode == 0, status.stdout + status.stderr
        rows = [json.loads(line) for line in status.stdout.splitlines()]
        services = sorted(r["service"] for r in rows)
        assert services == ["frontend", "gms", "planner", "router", "worker", "worker"]
        assert all(r["health"] == "SERVING" for r in rows)
        workers = [r for r in rows if r["service"] == "worker"]
        assert {w["address"] for w in workers} == {f"127.0.0.1:{base + 7}", f"127.0.0.1:{base + 8}"}
        assert all(w["model_card"]["engine"] == "mocker" for w in workers)

        table = run_to_exit(["status", "--discovery", discovery])
        assert table.returncode == 0 and "SERVING" in table.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "up.log").read_text()
        after = run_to_exit(["status", "--discovery", discovery, "--json-output"])
        assert after.stdout.strip() == ""
        assert "Traceback" not in (tmp_path / "up.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_default_up_serves_the_real_model_and_knows_paris(tmp_path: Path) -> None:
    """What `make run` does: the default engine is the real SmolLM2 on the CPU."""
    import openai

    base = _free_block(12)
    argv = [
        sys.executable, "-m", "tokenyard.cli", "up", "--workers", "1",
        "--discovery", f"dir://{tmp_path / 'discovery'}", "--state-dir", str(tmp_path / "state"),
        "--http-port", str(base), "--grpc-port", str(base + 1),
        "--router-port", str(base + 2), "--planner-port", str(base + 4),
        "--gms-metrics-port", str(base + 6), "--worker-port", str(base + 7),
        "--worker-metrics-port", str(base + 9),
    ]  # fmt: skip
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        try:
            deadline = time.monotonic() + 300
            while "tokenyard is up" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{base}/v1", api_key="unused", timeout=120)
            reply = client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24,
            )
            assert "Paris" in (reply.choices[0].message.content or "")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
