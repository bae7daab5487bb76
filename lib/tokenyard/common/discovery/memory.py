"""Process-local discovery for unit tests: same leases and events as the real backends, no I/O."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from tokenyard.common.discovery.base import WatchEvent
from tokenyard.common.discovery.lease import LeasedDiscovery
from tokenyard.common.discovery.records import Instance
from tokenyard.common.discovery.view import InstanceView


class _Store:
    def __init__(self) -> None:
        self.records: dict[int, tuple[Instance, float]] = {}  # id -> (record, monotonic expiry)
        self.waiters: set[asyncio.Event] = set()

    def changed(self) -> None:
        for waiter in self.waiters:
            waiter.set()

    def live(self, service: str | None) -> list[Instance]:
        now = time.monotonic()
        expired = [i for i, (_, deadline) in self.records.items() if deadline <= now]
        for instance_id in expired:
            del self.records[instance_id]
        return [inst for inst, _ in self.records.values() if service is None or inst.service == service]


_STORES: dict[str, _Store] = {}


class MemoryDiscovery(LeasedDiscovery):
    """Clients opened with the same ``memory://name`` share one registry within the process."""

    def __init__(self, name: str, *, ttl: float, poll_interval: float = 0.05) -> None:
        super().__init__(f"memory://{name}", ttl)
        self._store = _STORES.setdefault(name, _Store())
        self._poll = poll_interval

    def abandon(self) -> None:
        """Stop every heartbeat without deregistering, as if this process had been killed."""
        for lease in self._leases.values():
            lease.stopped = True
            if lease.task is not None:
                lease.task.cancel()
        self._leases.clear()

    async def _put(self, instance: Instance) -> None:
        self._store.records[instance.instance_id] = (instance, time.monotonic() + self.ttl)
        self._store.changed()

    async def _refresh(self, instance: Instance) -> bool:
        gone = instance.instance_id not in {i.instance_id for i in self._store.live(None)}
        await self._put(instance)
        return gone

    async def _delete(self, instance_id: int, service: str | None) -> None:
        record = self._store.records.get(instance_id)
        if record is not None and (service is None or record[0].service == service):
            del self._store.records[instance_id]
            self._store.changed()

    async def _live(self, service: str | None) -> list[Instance]:
        return self._store.live(service)

    async def watch(self, service: str | None = None) -> AsyncIterator[WatchEvent]:
        self._check_open()
        view = InstanceView()
        wake = asyncio.Event()
        self._store.waiters.add(wake)
        try:
            while not self._closed:
                wake.clear()
                for event in view.sync(self._store.live(service)):
                    yield event
                # Changes wake the watcher at once; expiries are found by the poll.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=self._poll)
        finally:
            self._store.waiters.discard(wake)

    async def _close_backend(self) -> None:
        self._store.changed()  # lets this client's watchers see that it is closed
