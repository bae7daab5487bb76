"""Registration under a lease, shared by every backend: one heartbeat task per registered instance."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from tokenyard.common.discovery.base import WatchEvent
from tokenyard.common.discovery.errors import DiscoveryError
from tokenyard.common.discovery.records import Instance

log = logging.getLogger("tokenyard.common.discovery")


class _Lease:
    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        # Held while the record is written, so that a deregistration never races a heartbeat that would
        # write the record back just after it was deleted.
        self.lock = asyncio.Lock()
        self.stopped = False
        self.task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        async with self.lock:
            self.stopped = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class LeasedDiscovery(ABC):
    """Implements the lease bookkeeping of :class:`~tokenyard.common.discovery.base.Discovery`.

    A backend provides how a record is written (:meth:`_put`), refreshed (:meth:`_refresh`), deleted
    (:meth:`_delete`) and listed (:meth:`_live`), and how changes are watched.
    """

    def __init__(self, display_url: str, ttl: float) -> None:
        self.url = display_url
        self.ttl = ttl
        self._leases: dict[int, _Lease] = {}
        self._closed = False
        self._closed_event = asyncio.Event()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, ttl={self.ttl})"

    # --- what a backend provides -------------------------------------------------------------------

    @abstractmethod
    async def _put(self, instance: Instance) -> None:
        """Write the record with a fresh lease; raise DiscoveryError when the backend is unreachable."""

    @abstractmethod
    async def _refresh(self, instance: Instance) -> bool:
        """Renew the lease, writing the record again if it is gone; True when it had to be re-created."""

    @abstractmethod
    async def _delete(self, instance_id: int, service: str | None) -> None:
        """Remove the record of ``instance_id`` (of ``service`` when known)."""

    @abstractmethod
    async def _live(self, service: str | None) -> list[Instance]:
        """Every unexpired record, of ``service`` or of all."""

    @abstractmethod
    def watch(self, service: str | None = None) -> AsyncIterator[WatchEvent]: ...

    @abstractmethod
    async def _close_backend(self) -> None:
        """Release connections; called once by :meth:`close`, after the leases are gone."""

    # --- the Discovery interface -------------------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        self._check_open()
        previous = self._leases.pop(instance.instance_id, None)
        if previous is not None:
            await previous.stop()
        await self._put(instance)
        lease = _Lease(instance)
        lease.task = asyncio.create_task(
            self._heartbeat(lease), name=f"discovery-heartbeat-{instance.service}-{instance.instance_id}"
        )
        self._leases[instance.instance_id] = lease

    async def deregister(self, instance_id: int) -> None:
        self._check_open()
        lease = self._leases.pop(instance_id, None)
        service = None
        if lease is not None:
            await lease.stop()
            service = lease.instance.service
        await self._delete(instance_id, service)

    async def instances(self, service: str | None = None) -> list[Instance]:
        self._check_open()
        return sorted(await self._live(service), key=lambda i: (i.service, i.instance_id))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        leases = list(self._leases.values())
        self._leases.clear()
        for lease in leases:
            await lease.stop()
        failure: DiscoveryError | None = None
        for lease in leases:
            try:
                await self._delete(lease.instance.instance_id, lease.instance.service)
            except DiscoveryError as exc:
                failure = failure or exc
        await self._close_backend()
        if failure is not None:
            raise failure

    # --- helpers -----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DiscoveryError(f"discovery client for {self.url} is closed")

    async def _sleep_unless_closed(self, seconds: float) -> bool:
        """Sleep; False when the client was closed meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed_event.wait(), timeout=max(0.0, seconds))
        return not self._closed

    async def _heartbeat(self, lease: _Lease) -> None:
        period = self.ttl / 3
        instance = lease.instance
        failing = False
        while True:
            await asyncio.sleep(period)
            async with lease.lock:
                if lease.stopped:
                    return
                try:
                    recreated = await self._refresh(instance)
                except Exception as exc:
                    # Once per outage: a lost backend must not flood the log every ttl/3. Anything but a
                    # DiscoveryError is a bug, so it gets its traceback; the heartbeat lives on regardless,
                    # since its death would silently expire a healthy instance.
                    if not failing:
                        log.warning(
                            "cannot renew the discovery lease of %s %d (retrying every %.1fs): %s",
                            instance.service,
                            instance.instance_id,
                            period,
                            exc,
                            exc_info=not isinstance(exc, DiscoveryError),
                        )
                    failing = True
                    continue
            if failing:
                log.info(
                    "discovery at %s answers again; lease of %s %d renewed",
                    self.url,
                    instance.service,
                    instance.instance_id,
                )
                failing = False
            elif recreated:
                log.info(
                    "the record of %s %d had gone from %s; registered it again",
                    instance.service,
                    instance.instance_id,
                    self.url,
                )
