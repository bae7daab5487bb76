"""The set of workers the router may choose from, kept current by a discovery watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from tokenyard.common.discovery import Discovery, DiscoveryError, Instance, WatchEventKind

log = logging.getLogger(__name__)


class WorkerSet:
    """``instance id -> Instance`` of every registered worker, in registration order."""

    def __init__(self) -> None:
        self._workers: dict[int, Instance] = {}
        self._listeners: list[Callable[[WatchEventKind, Instance], None]] = []

    def on_change(self, listener: Callable[[WatchEventKind, Instance], None]) -> None:
        self._listeners.append(listener)

    def apply(self, kind: WatchEventKind, instance: Instance) -> None:
        if kind is WatchEventKind.REMOVED:
            if self._workers.pop(instance.instance_id, None) is None:
                return
            log.info("worker %d at %s left", instance.instance_id, instance.address)
        else:
            if instance.instance_id not in self._workers:
                log.info("worker %d at %s joined", instance.instance_id, instance.address)
            self._workers[instance.instance_id] = instance
        for listener in self._listeners:
            listener(kind, instance)

    def get(self, instance_id: int) -> Instance | None:
        return self._workers.get(instance_id)

    def for_model(self, model: str) -> list[Instance]:
        """Workers serving ``model`` that take requests from clients (not prefill-only ones)."""
        return [
            w
            for w in self._workers.values()
            if w.model_card is not None and w.model_card.model == model and w.model_card.role != "prefill"
        ]

    def __len__(self) -> int:
        return len(self._workers)


class WorkerWatch:
    """Feeds a :class:`WorkerSet` from discovery until closed; survives discovery outages."""

    def __init__(self, discovery: Discovery, workers: WorkerSet) -> None:
        self._discovery = discovery
        self._workers = workers
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="worker-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async for event in self._discovery.watch("worker"):
                    self._workers.apply(event.kind, event.instance)
            except DiscoveryError as exc:
                log.warning("worker watch failed, retrying in 1s: %s", exc)
                await asyncio.sleep(1.0)
