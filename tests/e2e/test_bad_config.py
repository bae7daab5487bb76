"""Bad configuration ends with one line naming the setting and a non-zero exit, never a traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.processes import run_to_exit

pytestmark = pytest.mark.e2e


@pytest.fixture
def busy_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def _assert_one_line_error(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert "error:" in last, stderr
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"


@pytest.mark.parametrize("service", ["router", "planner", "worker", "frontend", "gms"])
def test_unknown_flag(service: str) -> None:
    result = run_to_exit([service, "--no-such-flag", "1"])
    assert result.returncode == 2
    _assert_one_line_error(result.stderr, "--no-such-flag")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["router", "--port", "70000"], ["--port", "TOKENYARD_ROUTER_PORT", "70000"]),
        (["router", "--discovery-ttl", "-3"], ["--discovery-ttl", "TOKENYARD_ROUTER_DISCOVERY_TTL"]),
        (["worker", "--engine", "warp-drive"], ["--engine", "TOKENYARD_WORKER_ENGINE"]),
        (["frontend", "--port", "9000", "--http-port", "9000"], ["--http-port"]),
        (["gms", "--socket", "relative.sock"], ["--socket", "TOKENYARD_GMS_SOCKET"]),
    ],
)
def test_invalid_value(argv: list[str], needles: list[str]) -> None:
    result = run_to_exit(argv)
    assert result.returncode == 2
    _assert_one_line_error(result.stderr, *needles)


def test_invalid_env_value() -> None:
    result = run_to_exit(["router"], env={"TOKENYARD_ROUTER_METRICS_PORT": "eighty"})
    assert result.returncode == 2
    _assert_one_line_error(result.stderr, "TOKENYARD_ROUTER_METRICS_PORT", "--metrics-port")


def test_port_in_use(busy_port: int, tmp_path: Path) -> None:
    result = run_to_exit(
        ["router", "--port", str(busy_port), "--metrics-port", "0", "--discovery", f"dir://{tmp_path}"]
    )
    assert result.returncode == 1
    _assert_one_line_error(result.stderr, "--port", "TOKENYARD_ROUTER_PORT", str(busy_port))


def test_metrics_port_in_use(busy_port: int, tmp_path: Path) -> None:
    result = run_to_exit(
        ["planner", "--port", "0", "--metrics-port", str(busy_port), "--discovery", f"dir://{tmp_path}"]
    )
    assert result.returncode == 1
    _assert_one_line_error(result.stderr, "--metrics-port", "TOKENYARD_PLANNER_METRICS_PORT")


def test_unreachable_redis() -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    result = run_to_exit(
        ["router", "--port", "0", "--metrics-port", "0", "--discovery", "redis://127.0.0.1:1/0"]
    )
    assert result.returncode == 1
    _assert_one_line_error(
        result.stderr, "--discovery", "TOKENYARD_ROUTER_DISCOVERY", "redis://127.0.0.1:1/0"
    )


def test_bad_discovery_url() -> None:
    result = run_to_exit(["router", "--port", "0", "--metrics-port", "0", "--discovery", "etcd://nowhere"])
    assert result.returncode == 1
    _assert_one_line_error(result.stderr, "--discovery")
