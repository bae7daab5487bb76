"""Two frontend processes on one HTTP port (--http-reuse-port): both start, both serve, and the port
keeps serving when one of them stops. Without the option the second one cannot start."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.processes import ServiceProcess, wait_for_instance

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _complete(port: int) -> str:
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 3}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return str(json.loads(r.read())["choices"][0]["finish_reason"])


def _serves(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert _complete(port) == "length"
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _frontend(root: Path, name: str, discovery: str, http_port: int, *extra: str) -> ServiceProcess:
    argv = ["frontend", "--port", "0", "--http-port", str(http_port), "--discovery", discovery, *extra]
    return ServiceProcess(argv, root / f"{name}.log")


def test_two_frontends_share_one_http_port(tmp_path: Path) -> None:
    discovery = f"dir://{tmp_path / 'discovery'}"
    port = _free_port()
    backend = [
        ServiceProcess(
            ["router", "--port", "0", "--metrics-port", "0", "--discovery", discovery],
            tmp_path / "router.log",
        ),
        ServiceProcess(
            [
                "worker",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--discovery",
                discovery,
                "--mocker-speedup-ratio",
                "0",
            ],
            tmp_path / "worker.log",
        ),
    ]
    frontends: list[ServiceProcess] = []
    try:
        asyncio.run(wait_for_instance(discovery, "worker", proc=backend[1]))
        frontends.append(_frontend(tmp_path, "a", discovery, port, "--http-reuse-port"))
        frontends.append(_frontend(tmp_path, "b", discovery, port, "--http-reuse-port"))
        _serves(port)
        # Without the option, a third process finds the port taken.
        refused = _frontend(tmp_path, "c", discovery, port)
        try:
            assert refused.proc.wait(timeout=60) != 0
            assert "address already in use" in refused.output()
        finally:
            refused.close()
        assert all(f.proc.poll() is None for f in frontends)
        for _ in range(20):
            assert _complete(port) == "length"
        # One of them leaves; the other still answers on the port.
        assert frontends[0].terminate() == 0
        for _ in range(10):
            assert _complete(port) == "length"
    finally:
        for proc in [*frontends, *backend]:
            proc.close()
