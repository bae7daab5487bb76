"""Worker processes started and stopped while a deployment runs (the planner's local connector).

A :class:`WorkerProcess` is one ``tokenyard worker`` child with the deployment's flags: it starts
in its own session (a Ctrl-C meant for the supervisor does not reach it), writes its output to a
log file and its pid to a pid file, is ready when its gRPC health check answers SERVING, and
stops by draining first (the ``Drain`` RPC: deregister, refuse new work, let in-flight requests
finish within a grace period), then SIGTERM, then SIGKILL for one that outlives its timeout.

Pid files let a restarted supervisor stop the workers a crashed one left behind
(:func:`reap_leftovers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.tls import PLAINTEXT, Tls
from tokenyard.deploy.status import health_of


class WorkerStartError(Exception):
    """A worker exited or did not turn ready in time; the message ends with its last log lines."""


@dataclass(frozen=True)
class WorkerLaunch:
    """How every worker of a pool is started: the deployment's flags plus a role."""

    engine: str
    model: str
    role: str
    host: str
    discovery: str
    log_level: str = "info"
    extra_args: tuple[str, ...] = ()

    def argv(self, port: int, metrics_port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tokenyard.cli",
            "worker",
            "--host",
            self.host,
            "--discovery",
            self.discovery,
            "--log-level",
            self.log_level,
            "--engine",
            self.engine,
            "--model",
            self.model,
            "--role",
            self.role,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            *self.extra_args,
        ]


def free_port(host: str) -> int:
    """A port that was free a moment ago (the worker binds it soon after)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class WorkerProcess:
    def __init__(
        self,
        name: str,
        launch: WorkerLaunch,
        port: int,
        metrics_port: int,
        state_dir: Path,
        tls: Tls = PLAINTEXT,
    ) -> None:
        self.name = name
        # With mTLS on, health checks and Drain present the launcher's certificate.
        self.tls = tls
        self.launch = launch
        self.port = port
        self.metrics_port = metrics_port
        self.state_dir = state_dir
        self.log_path = state_dir / f"{name}.log"
        self.pid_path = state_dir / f"{name}.pid"
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        host = self.launch.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def _open_log(self) -> IO[bytes]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_path, "ab")  # closed in stop()

    async def start(self) -> None:
        self._log = self._open_log()
        self.proc = await asyncio.create_subprocess_exec(
            *self.launch.argv(self.port, self.metrics_port),
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        self.pid_path.write_text(f"{self.proc.pid}\n")

    def tail(self, lines: int = 10) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, timeout: float) -> None:
        """Until the health check answers SERVING; :class:`WorkerStartError` if it exits or times out."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise WorkerStartError(
                    f"{self.name} exited with code {self.proc.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.tail()}"
                )
            if await health_of(self.address, 1.0, self.tls, "worker") == "SERVING":
                return
            if time.monotonic() > deadline:
                raise WorkerStartError(
                    f"{self.name} not ready after {timeout:.0f}s; last lines of {self.log_path}:\n{self.tail()}"
                )
            await asyncio.sleep(0.2)

    async def drain(self, grace_s: float, timeout: float) -> None:
        """Stop taking new work and wait (up to ``grace_s``) for in-flight requests."""
        async with self.tls.channel(self.address, "worker") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            await stub.Drain(
                worker_pb2.DrainRequest(grace_period_ms=int(grace_s * 1000), wait=True), timeout=timeout
            )

    async def stop(self, grace_s: float) -> int | None:
        """Drain, SIGTERM, and SIGKILL after ``grace_s + 10`` seconds; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(grpc.aio.AioRpcError, OSError):
                await self.drain(grace_s, timeout=grace_s + 5)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s + 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self.pid_path.unlink(missing_ok=True)
        return self.proc.returncode


def _is_tokenyard_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"tokenyard.cli" in cmdline and b"worker" in cmdline


def reap_leftovers(state_dir: Path, names: Sequence[str] | None = None) -> list[int]:
    """SIGTERM the workers whose pid files a previous supervisor left in ``state_dir``; returns their pids."""
    reaped: list[int] = []
    if not state_dir.is_dir():
        return reaped
    for pid_file in sorted(state_dir.glob("*.pid")):
        if names is not None and pid_file.stem not in names:
            continue
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and _is_tokenyard_worker(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
                reaped.append(pid)
        pid_file.unlink(missing_ok=True)
    return reaped
