"""Discovery against a real Redis and a real directory, with real child processes.

One suite runs on both backends; what only Redis can do (restart, outage) follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.discovery import RegistrantFactory
from tests.fixtures.redis_server import RedisServer, _free_port
from tokenyard.common.discovery import (
    Discovery,
    DiscoveryError,
    Instance,
    ModelCard,
    WatchEvent,
    WatchEventKind,
    new_instance_id,
    open_discovery,
)

pytestmark = pytest.mark.integration

TTL = 2.0  # short leases keep expiry tests quick; heartbeats run every TTL/3
DEADLINE = 15.0  # generous bound for anything that should happen within TTL + one resync

CARD = ModelCard("smollm2-135m", "smollm2", 16, 2048, 512, "mocker", "aggregated")


@dataclass
class Backend:
    name: str
    url: str
    redis: RedisServer | None = None


@pytest.fixture(params=["redis", "directory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return Backend("redis", server.url, server)
    return Backend("directory", f"dir://{tmp_path / 'discovery'}")


@pytest.fixture
async def clients(backend: Backend) -> AsyncIterator[Callable[..., Discovery]]:
    """``clients(ttl=...)`` opens a client on the backend; all are closed at the end."""
    opened: list[Discovery] = []

    def open_client(ttl: float = TTL) -> Discovery:
        client = open_discovery(backend.url, ttl=ttl)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        with contextlib.suppress(DiscoveryError):
            await client.close()


def instance(service: str = "worker", **changes: Any) -> Instance:
    fields: dict[str, Any] = {
        "instance_id": new_instance_id(),
        "service": service,
        "role": "aggregated" if service == "worker" else "",
        "address": "127.0.0.1:8300",
        "metrics_address": "127.0.0.1:9300",
        "model_card": CARD if service == "worker" else None,
        "metadata": {"engine_version": "1"},
    }
    fields.update(changes)
    return Instance(**fields)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = DEADLINE) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


async def ids(discovery: Discovery, service: str | None = None) -> set[int]:
    return {i.instance_id for i in await discovery.instances(service)}


class Watcher:
    """Consumes ``discovery.watch(service)`` in a task and keeps every event."""

    def __init__(self, discovery: Discovery, service: str | None = None) -> None:
        self.events: list[WatchEvent] = []
        self._task = asyncio.create_task(self._run(discovery, service))

    async def _run(self, discovery: Discovery, service: str | None) -> None:
        async for event in discovery.watch(service):
            self.events.append(event)

    def seen(self, kind: WatchEventKind, instance_id: int) -> bool:
        return any(e.kind is kind and e.instance.instance_id == instance_id for e in self.events)

    async def wait_for(self, kind: WatchEventKind, instance_id: int, within: float = DEADLINE) -> None:
        async def check() -> bool:
            if self._task.done():
                self._task.result()  # re-raises what ended the watch
                raise AssertionError(f"the watch ended; events: {self.events}")
            return self.seen(kind, instance_id)

        await eventually(check, f"watch reports {kind.name} {instance_id}; got {self.events}", within)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
async def watchers() -> AsyncIterator[Callable[..., Watcher]]:
    started: list[Watcher] = []

    def start(discovery: Discovery, service: str | None = None) -> Watcher:
        watcher = Watcher(discovery, service)
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        await watcher.stop()


def list_from_another_process(url: str, service: str | None = None) -> list[Instance]:
    """What a separate process finds in discovery."""
    code = (
        "import asyncio, sys\n"
        "from tokenyard.common.discovery import open_discovery\n"
        "async def main():\n"
        "    d = open_discovery(sys.argv[1])\n"
        "    for i in await d.instances(sys.argv[2] or None):\n"
        "        print(i.to_json())\n"
        "    await d.close()\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, url, service or ""],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [Instance.from_json(line) for line in done.stdout.splitlines()]


# --- both backends -------------------------------------------------------------------------------


async def test_registered_instance_is_listed_by_other_clients(clients: Callable[..., Discovery]) -> None:
    owner, reader = clients(), clients()
    worker = instance()
    await owner.register(worker)
    assert await reader.instances() == [worker]
    assert await reader.instances("worker") == [worker]


async def test_deregister_removes_at_once(clients: Callable[..., Discovery]) -> None:
    owner, reader = clients(), clients()
    kept, dropped = instance(), instance()
    await owner.register(kept)
    await owner.register(dropped)
    await owner.deregister(dropped.instance_id)
    assert await ids(reader) == {kept.instance_id}
    # Its heartbeat is stopped too: the record does not come back.
    await asyncio.sleep(TTL / 2)
    assert await ids(reader) == {kept.instance_id}


async def test_watch_sees_existing_then_added_updated_removed(
    clients: Callable[..., Discovery], watchers: Callable[..., Watcher]
) -> None:
    owner, watching = clients(), clients()
    early = instance()
    await owner.register(early)
    watcher = watchers(watching, "worker")
    await watcher.wait_for(WatchEventKind.ADDED, early.instance_id)
    assert [e.kind for e in watcher.events] == [WatchEventKind.ADDED]
    assert watcher.events[0].instance == early

    late = instance()
    await owner.register(late)
    await watcher.wait_for(WatchEventKind.ADDED, late.instance_id)

    changed = instance(instance_id=late.instance_id, address="127.0.0.1:8399")
    await owner.register(changed)
    await watcher.wait_for(WatchEventKind.UPDATED, late.instance_id)
    assert watcher.events[-1].instance == changed

    await owner.deregister(early.instance_id)
    await watcher.wait_for(WatchEventKind.REMOVED, early.instance_id)
    assert [(e.kind, e.instance.instance_id) for e in watcher.events] == [
        (WatchEventKind.ADDED, early.instance_id),
        (WatchEventKind.ADDED, late.instance_id),
        (WatchEventKind.UPDATED, late.instance_id),
        (WatchEventKind.REMOVED, early.instance_id),
    ]


async def test_sigkilled_process_expires_and_watchers_see_it_go(
    backend: Backend,
    clients: Callable[..., Discovery],
    watchers: Callable[..., Watcher],
    registrants: RegistrantFactory,
) -> None:
    child = registrants(backend.url, ttl=TTL)
    assert child.instance is not None
    victim = child.instance.instance_id
    reader = clients()
    watcher = watchers(clients(), "worker")
    await watcher.wait_for(WatchEventKind.ADDED, victim)
    # Outlive a whole lease: only the child's heartbeat can be keeping the record.
    await asyncio.sleep(TTL * 1.5)
    assert victim in await ids(reader)
    assert not watcher.seen(WatchEventKind.REMOVED, victim)

    child.kill()

    async def gone() -> bool:
        return victim not in await ids(reader)

    await eventually(gone, "the killed process's record expires")
    await watcher.wait_for(WatchEventKind.REMOVED, victim)


async def test_sigterm_deregisters_before_exit(
    backend: Backend, clients: Callable[..., Discovery], registrants: RegistrantFactory
) -> None:
    child = registrants(backend.url, ttl=TTL)
    assert child.instance is not None
    reader = clients()
    assert child.instance.instance_id in await ids(reader)
    assert child.terminate() == 0
    assert child.instance.instance_id not in await ids(reader)


async def test_processes_see_each_other(
    backend: Backend, clients: Callable[..., Discovery], registrants: RegistrantFactory
) -> None:
    children = [registrants(backend.url, service="worker"), registrants(backend.url, service="router")]
    local = instance(service="planner")
    await clients().register(local)
    expected = {local.instance_id} | {c.instance.instance_id for c in children if c.instance is not None}
    assert await ids(clients()) == expected
    seen_elsewhere = await asyncio.to_thread(list_from_another_process, backend.url)
    assert {i.instance_id for i in seen_elsewhere} == expected
    assert local in seen_elsewhere


async def test_filtering_by_service(
    clients: Callable[..., Discovery], watchers: Callable[..., Watcher]
) -> None:
    owner = clients()
    router, planner = instance("router"), instance("planner")
    workers = [instance(), instance()]
    for inst in (router, planner, *workers):
        await owner.register(inst)
    reader = clients()
    assert await ids(reader, "worker") == {w.instance_id for w in workers}
    assert await reader.instances("router") == [router]
    assert await reader.instances("gms") == []
    assert await ids(reader) == {router.instance_id, planner.instance_id} | {w.instance_id for w in workers}

    router_watch = watchers(clients(), "router")
    await router_watch.wait_for(WatchEventKind.ADDED, router.instance_id)
    second_router, third_worker = instance("router"), instance()
    await owner.register(third_worker)
    await owner.register(second_router)
    await router_watch.wait_for(WatchEventKind.ADDED, second_router.instance_id)
    await owner.deregister(workers[0].instance_id)
    await owner.deregister(router.instance_id)
    await router_watch.wait_for(WatchEventKind.REMOVED, router.instance_id)
    assert {e.instance.service for e in router_watch.events} == {"router"}


async def test_close_deregisters_everything_the_client_registered(clients: Callable[..., Discovery]) -> None:
    owner, other, reader = clients(), clients(), clients()
    mine = [instance(), instance("router")]
    theirs = instance()
    for inst in mine:
        await owner.register(inst)
    await other.register(theirs)
    await owner.close()
    assert await ids(reader) == {theirs.instance_id}
    with pytest.raises(DiscoveryError, match="closed"):
        await owner.instances()


async def test_watch_ends_when_its_client_closes(
    clients: Callable[..., Discovery], watchers: Callable[..., Watcher]
) -> None:
    watching = clients()
    watcher = watchers(watching)
    await asyncio.sleep(0.1)
    await watching.close()
    await asyncio.wait_for(watcher._task, DEADLINE)


# --- Redis only ----------------------------------------------------------------------------------


async def test_redis_restart_registers_every_running_instance_again(
    redis_server: RedisServer,
    registrants: RegistrantFactory,
    watchers: Callable[..., Watcher],
) -> None:
    local = open_discovery(redis_server.url, ttl=TTL)
    # A watcher that rescans often, and a child whose heartbeat is slow: the watcher sees the emptied
    # Redis well before the child writes its record again.
    watching = open_discovery(redis_server.url, ttl=TTL, resync_interval=0.1)
    try:
        child = registrants(redis_server.url, ttl=3 * TTL)
        assert child.instance is not None
        mine = instance()
        await local.register(mine)
        running = {mine.instance_id, child.instance.instance_id}
        watcher = watchers(watching, "worker")
        for instance_id in running:
            await watcher.wait_for(WatchEventKind.ADDED, instance_id)

        redis_server.restart()

        async def back() -> bool:
            return await ids(watching) == running

        await eventually(back, "every running instance registers again")

        # The watch is still live: it sees what happens after the restart ...
        newcomer = instance()
        await local.register(newcomer)
        await watcher.wait_for(WatchEventKind.ADDED, newcomer.instance_id)
        await local.deregister(mine.instance_id)
        await watcher.wait_for(WatchEventKind.REMOVED, mine.instance_id)
        # ... and it did not report the instances that were only briefly missing as gone.
        assert not watcher.seen(WatchEventKind.REMOVED, child.instance.instance_id)
        assert sum(watcher.seen(WatchEventKind.ADDED, i) for i in running) == 2
    finally:
        await local.close()
        await watching.close()


async def test_redis_outage_is_logged_once_and_survived(
    redis_server: RedisServer, watchers: Callable[..., Watcher], caplog: pytest.LogCaptureFixture
) -> None:
    owner = open_discovery(redis_server.url, ttl=TTL)
    watching = open_discovery(redis_server.url, ttl=TTL)
    try:
        survivor = instance()
        await owner.register(survivor)
        watcher = watchers(watching)
        await watcher.wait_for(WatchEventKind.ADDED, survivor.instance_id)
        caplog.set_level(logging.INFO, logger="tokenyard.common.discovery")

        redis_server.stop()
        with pytest.raises(DiscoveryError) as caught:
            await owner.instances()
        assert redis_server.url in str(caught.value)
        await asyncio.sleep(TTL * 1.5)  # several heartbeats and watch retries fail meanwhile
        redis_server.start()

        async def back() -> bool:
            return survivor.instance_id in await ids(owner)

        await eventually(back, "the heartbeat writes the record again")
        latecomer = instance()
        await owner.register(latecomer)
        await watcher.wait_for(WatchEventKind.ADDED, latecomer.instance_id)
        assert not watcher.seen(WatchEventKind.REMOVED, survivor.instance_id)
    finally:
        await owner.close()
        await watching.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot renew the discovery lease" in m for m in messages) == 1, messages
    assert sum("lost discovery at" in m for m in messages) == 1, messages
    assert not any(r.exc_info for r in caplog.records), "no tracebacks for an outage"


async def test_unreachable_redis_is_a_one_line_error_naming_the_url() -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    discovery = open_discovery(url, ttl=TTL)
    try:
        for attempt in (discovery.register(instance()), discovery.instances()):
            with pytest.raises(DiscoveryError) as caught:
                await attempt
            message = str(caught.value)
            assert message.startswith(f"cannot reach {url}: "), message
            assert "\n" not in message
        with pytest.raises(DiscoveryError, match="cannot reach"):
            await anext(discovery.watch())
    finally:
        await discovery.close()


async def test_records_are_plain_json_under_leased_keys(redis_server: RedisServer) -> None:
    from redis.asyncio import Redis

    owner = open_discovery(redis_server.url, ttl=TTL)
    worker = instance()
    await owner.register(worker)
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = f"tokenyard:instances:worker:{worker.instance_id}"
        stored = await raw.get(key)
        assert stored is not None and Instance.from_json(stored) == worker
        assert 0 < await raw.pttl(key) <= TTL * 1000
        # A malformed record written by someone else is skipped, not fatal.
        await raw.set("tokenyard:instances:worker:1", json.dumps({"instance_id": 1}), px=int(TTL * 1000))
        assert await owner.instances() == [worker]
    finally:
        await raw.aclose()
        await owner.close()


# --- directory only ------------------------------------------------------------------------------


async def test_directory_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    discovery = open_discovery(f"dir://{blocker}", ttl=TTL)
    with pytest.raises(DiscoveryError, match=f"cannot use discovery directory {blocker}"):
        await discovery.register(instance())
    with pytest.raises(DiscoveryError, match="cannot use discovery directory"):
        await discovery.instances()
    await discovery.close()


async def test_directory_ignores_malformed_and_expired_files(tmp_path: Path) -> None:
    root = tmp_path / "discovery"
    owner = open_discovery(f"dir://{root}", ttl=TTL)
    worker = instance()
    await owner.register(worker)
    (root / "worker.5.json").write_text("{not json")
    stale = instance()
    stale_file = root / f"worker.{stale.instance_id}.json"
    stale_file.write_text(json.dumps({"ttl": 1.0, "instance": stale.to_dict()}))
    old = time.time() - 60
    os.utime(stale_file, (old, old))
    assert await owner.instances() == [worker]
    assert not stale_file.exists()  # long expired: swept by the reader
    await owner.close()
    assert sorted(p.name for p in root.iterdir()) == ["worker.5.json"]
