"""`tokenyard up` heals: a child killed with SIGKILL is restarted and the deployment keeps serving;
one that keeps dying is given up on with a reason; `tokenyard down` finds the deployment from any
folder and a stop leaves no pid file or socket behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"


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


def _until(check: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.2)


def _children(parent: int) -> dict[int, str]:
    """pid -> command line of each child of ``parent``."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Field 4 of /proc/PID/stat, after the parenthesised command name.
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            out[int(entry.name)] = cmdline
    return out


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    state_dir: Path
    log_path: Path
    base: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child(self, needle: str) -> int:
        """The pid of the child whose command line holds ``needle`` (once it runs)."""
        found: list[int] = []

        def running() -> bool:
            found[:] = [pid for pid, cmd in _children(self.proc.pid).items() if needle in cmd]
            return len(found) == 1

        _until(running, f"a child running {needle!r}")
        return found[0]

    def kill(self, needle: str) -> int:
        pid = self.child(needle)
        os.kill(pid, signal.SIGKILL)
        return pid


@contextlib.contextmanager
def tokenyard_up(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[Up]:
    base = _free_block(12)
    argv = [
        sys.executable, "-m", "tokenyard.cli", "up", "--engine", "mocker", "--workers", "2",
        "--discovery", f"dir://{tmp_path / 'discovery'}", "--state-dir", str(tmp_path / "state"),
        "--http-port", str(base), "--grpc-port", str(base + 1), "--router-port", str(base + 2),
        "--planner-port", str(base + 4), "--gms-metrics-port", str(base + 6),
        "--worker-port", str(base + 7), "--worker-metrics-port", str(base + 9), "--grace-period", "3",
        *flags,
    ]  # fmt: skip
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    up = Up(proc, tmp_path / "state", log_path, base)
    try:
        _until(lambda: "tokenyard is up" in up.log() or proc.poll() is not None, "the deployment is up")
        assert proc.poll() is None, up.log()
        yield up
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                for pid in _children(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()


def _serves(up: Up) -> bool:
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    request = urllib.request.Request(up.http + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _router_active(up: Up) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{up.base + 3}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("tokenyard_router_active_requests "):
                return float(line.split()[1])
    return -1.0


def test_a_killed_child_comes_back_and_down_works_from_any_folder(tmp_path: Path) -> None:
    with tokenyard_up(tmp_path) as up:
        assert (up.state_dir / "up.pid").read_text().strip() == str(up.proc.pid)
        assert (up.state_dir / "gms-0.sock").exists()
        old = up.kill(f"--port {up.base + 7}")
        _until(
            lambda: "worker-0 was killed by SIGKILL; restarting it" in up.log(), "the supervisor restarts it"
        )
        assert up.child(f"--port {up.base + 7}") != old
        assert up.proc.poll() is None
        _until(lambda: _serves(up), "the deployment serves")
        # From another folder, with only the state folder's location (as a user's default would be).
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        down = subprocess.run(
            [sys.executable, "-m", "tokenyard.cli", "down"],
            cwd=elsewhere,
            env={**os.environ, "TOKENYARD_UP_STATE_DIR": str(up.state_dir)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        assert up.proc.wait(30) == 0, up.log()
        assert sorted(p.name for p in up.state_dir.iterdir()) == []
        assert not _children(up.proc.pid)
        assert "Traceback" not in up.log()
        again = subprocess.run(
            [sys.executable, "-m", "tokenyard.cli", "down", "--state-dir", str(up.state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 0 and "nothing to stop" in again.stdout


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for its parent to read its status."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_children_stop_by_themselves_when_up_is_killed_outright(tmp_path: Path) -> None:
    with tokenyard_up(tmp_path) as up:
        children = _children(up.proc.pid)
        assert len(children) >= 5, children  # router, planner, gms, workers, frontend
        up.proc.kill()
        up.proc.wait(30)
        # Each child got SIGTERM from the kernel and shut down as on any SIGTERM.
        _until(lambda: not any(_alive(pid) for pid in children), "every child of the killed up stopped", 60)


def test_a_child_that_keeps_dying_is_given_up_on_with_a_reason(tmp_path: Path) -> None:
    with tokenyard_up(tmp_path, "--max-restarts", "1", "--restart-window", "300") as up:
        up.kill(f"--port {up.base + 8}")
        _until(lambda: "worker-1 was killed by SIGKILL; restarting it" in up.log(), "the first restart")
        _until(lambda: "worker-1" in up.log().split("restarting it", 1)[1], "the new worker-1 runs")
        up.kill(f"--port {up.base + 8}")
        assert up.proc.wait(60) == 1
        log = up.log()
        assert "worker-1 was killed by SIGKILL, after 1 restart(s) within 300s" in log
        assert "giving up on it" in log and "the deployment was stopped" in log
        assert not (up.state_dir / "up.pid").exists() and not list(up.state_dir.glob("*.sock"))


# ---- under load -------------------------------------------------------------------------------------


async def _stream(session: aiohttp.ClientSession, url: str, max_tokens: int) -> tuple[bool, int]:
    """(finished with a finish reason, tokens of text received) of one streaming completion."""
    # Prompts of their own: the router spreads them over both workers instead of following a cache.
    body = {
        "model": MODEL,
        "prompt": f"{random.random()} tell me a story",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    chunks = 0
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                return False, 0
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                doc = json.loads(line[6:])
                if "error" in doc:
                    return False, chunks
                chunks += 1
                if doc["choices"][0]["finish_reason"] is not None:
                    return True, chunks
    except (TimeoutError, aiohttp.ClientError):
        return False, chunks
    return False, chunks


async def _load_with_fault(up: Up, fault: Callable[[], object], streams: int = 50) -> list[tuple[bool, int]]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(_stream(session, up.http, 1000)) for _ in range(streams)]
        await asyncio.sleep(1.5)  # every stream is under way
        fault()
        return await asyncio.gather(*tasks)


@pytest.mark.slow
def test_fifty_streams_survive_a_killed_router_or_worker_and_a_killed_frontend_comes_back(
    tmp_path: Path,
) -> None:
    # The mocker decodes about 150 tokens/s per stream: 1000 tokens take several seconds, so each
    # fault (1.5 s in) lands mid-stream.
    env = {"TOKENYARD_WORKER_MOCKER__SPEEDUP_RATIO": "1.0"}
    with tokenyard_up(tmp_path, env=env) as up:
        for name, needle in (("router", f"--port {up.base + 2}"), ("worker", f"--port {up.base + 7}")):
            results = asyncio.run(_load_with_fault(up, lambda needle=needle: up.kill(needle)))  # type: ignore[misc]
            done = sum(ok for ok, _ in results)
            assert done == len(results), (name, results, up.log()[-3000:])
            if name == "worker":
                # The killed worker's streams moved to the other one and went on.
                with urllib.request.urlopen(up.http + "/metrics", timeout=10) as r:
                    metrics = r.read().decode()
                assert 'migration_type="ongoing_request"' in metrics, metrics
            _until(lambda: _serves(up), f"serving after the {name} restart")
        # Streams on a killed frontend are lost with it; the frontend comes back and serves.
        results = asyncio.run(_load_with_fault(up, lambda: up.kill(f"--http-port {up.base}")))
        _until(lambda: "frontend was killed by SIGKILL; restarting it" in up.log(), "the frontend restarts")
        _until(lambda: _serves(up), "a new frontend serves")
        # The router stops counting the dead frontend's requests once its notification stream broke.
        _until(lambda: _router_active(up) == 0.0, "the router released the dead frontend's requests")
        assert "released its" in up.log()
        after = asyncio.run(_load_with_fault(up, lambda: None, streams=20))
        assert all(ok for ok, _ in after), after
        assert up.proc.poll() is None
