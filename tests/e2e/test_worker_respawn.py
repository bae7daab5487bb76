"""``tokenyard worker --respawn`` with real processes: a template that has imported the engine
forks the worker, and forks a new one when it dies.

The default suite runs mocker workers: a SIGKILLed worker is replaced at once and serves; SIGTERM
stops the worker gracefully (deregistered) and then the template with status 0; a worker that
fails its startup is not respawned; a template killed outright takes its worker with it. The slow
variant runs a CPU worker whose weights are in a gms: its replacement maps them again and the
killed worker's read lock is released.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import grpc
import pytest

from tests.e2e.test_router_kv import eventually_true, instances
from tests.fixtures.processes import ServiceProcess, ServiceProcessFactory, gms_process
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Instance, open_discovery
from tokenyard.common.gms import LockState, get_info

pytestmark = [pytest.mark.e2e]


def _worker_argv(url: str, *extra: str) -> list[str]:
    return ["worker", "--respawn", "--port", "0", "--metrics-port", "0", "--discovery", url, *extra]


def _service_pids(template: ServiceProcess) -> list[int]:
    pid = template.proc.pid
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def _registered(url: str) -> list[Instance]:
    discovery = open_discovery(url)
    try:
        return list(await discovery.instances("worker"))
    finally:
        await discovery.close()


MODEL = "SmolLM2-135M-Instruct"


async def _generate_one(instance: Instance) -> int:
    request = worker_pb2.GenerateRequest(
        request_id=f"respawn-{time.monotonic_ns()}", model=MODEL, token_ids=list(range(1, 40))
    )
    request.stop.max_tokens = 4
    request.stop.ignore_eos = True
    tokens = 0
    async with grpc.aio.insecure_channel(instance.address) as channel:
        async for reply in worker_pb2_grpc.WorkerServiceStub(channel).Generate(request, timeout=60):
            tokens += len(reply.token_ids)
    return tokens


async def _replaced(url: str, old: Instance, template: ServiceProcess, timeout: float) -> Instance:
    """The instance registered in place of ``old`` (a new id)."""
    found: list[Instance] = []

    async def registered() -> bool:
        assert template.proc.poll() is None, template.output()
        found[:] = [i for i in await _registered(url) if i.instance_id != old.instance_id]
        return bool(found)

    await eventually_true(registered, "a respawned worker registers", timeout=timeout)
    return found[0]


async def test_a_killed_worker_is_respawned_and_sigterm_stops_both(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    template = spawn(_worker_argv(url))
    first = (await instances(url, "worker", 1, [template]))[0]
    assert await _generate_one(first) == 4
    [service] = _service_pids(template)
    assert service != template.proc.pid

    os.kill(service, signal.SIGKILL)
    second = await _replaced(url, first, template, timeout=20)
    assert await _generate_one(second) == 4
    [respawned] = _service_pids(template)
    assert respawned != service
    assert "was killed by SIGKILL" in template.output() and "respawning it" in template.output()

    assert template.terminate() == 0
    assert not _alive(respawned)
    # The worker shut down gracefully: it took its own record out of discovery.
    assert second.instance_id not in {i.instance_id for i in await _registered(url)}


async def test_a_worker_that_fails_its_startup_is_not_respawned(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        url = f"dir://{tmp_path / 'discovery'}"
        template = spawn(
            ["worker", "--respawn", "--port", str(port), "--metrics-port", "0", "--discovery", url]
        )
        code = await asyncio.to_thread(template.proc.wait, 60)
    out = template.output()
    assert code == 1, out
    assert out.count("error:") == 1, out
    assert "respawning" not in out


async def test_a_cpu_worker_without_its_model_fails_once_with_the_reason(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    template = spawn(_worker_argv(url, "--engine", "cpu", "--cpu-model-path", str(tmp_path / "missing")))
    code = await asyncio.to_thread(template.proc.wait, 120)
    out = template.output()
    assert code == 1, out
    assert out.count("no such file or directory") == 1 and "Traceback" not in out, out
    assert "respawning" not in out


async def test_a_killed_template_takes_its_worker_with_it(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    template = spawn(_worker_argv(url))
    first = (await instances(url, "worker", 1, [template]))[0]
    [service] = _service_pids(template)
    template.kill()

    async def gone() -> bool:
        return not _alive(service)

    await eventually_true(gone, "the worker stops with its template", timeout=15)
    # It got SIGTERM, not SIGKILL: it deregistered on its way out.
    assert first.instance_id not in {i.instance_id for i in await _registered(url)}


@pytest.mark.slow
async def test_a_respawned_cpu_worker_maps_its_weights_from_the_gms_again(
    spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    async with gms_process(spawn, url) as gms_socket:
        cpu = ["--engine", "cpu", "--cpu-gms", "--cpu-gms-socket", gms_socket]
        template = spawn(_worker_argv(url, *cpu, "--cpu-num-threads", "1", "--cpu-num-kv-blocks", "256"))
        first = (await instances(url, "worker", 1, [template], timeout=300))[0]
        assert await _generate_one(first) == 4
        [service] = _service_pids(template)
        os.kill(service, signal.SIGKILL)
        second = await _replaced(url, first, template, timeout=30)
        assert await _generate_one(second) == 4
        out = template.output()
        assert out.count("mapped SmolLM2") == 2, out
        # The killed worker's read lock went with its connection: one reader, the new worker.
        info = await asyncio.to_thread(get_info, gms_socket)
        assert (info.state, info.reader_count) == (LockState.RO, 1)
        assert template.terminate() == 0
