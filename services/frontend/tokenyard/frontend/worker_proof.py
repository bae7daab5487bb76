"""With mTLS, a worker's discovery record counts only once the worker proves it.

Anyone who can write to discovery can write a worker record. Requests never reach such a record's
address (every call to a worker checks its certificate), but before this check its model name
would still reach ``/v1/models`` and the KServe model list. So the frontend asks each new worker
for its description over mTLS first: the handshake proves it holds a worker certificate, and the
model it says it serves must be the one its record names. Only then does the record enter the
model registry. A worker that fails is logged once and asked again every ``retry_every`` seconds
while its record stays; a record that leaves is forgotten. Without TLS nothing can be proven and
records count as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Instance, WatchEventKind
from tokenyard.common.tls import Tls

log = logging.getLogger(__name__)

Apply = Callable[[WatchEventKind, Instance], None]


class WorkerProof:
    def __init__(self, tls: Tls, apply: Apply, *, retry_every: float = 5.0, timeout: float = 5.0) -> None:
        self._tls = tls
        self._apply = apply
        self._retry_every = retry_every
        self._timeout = timeout
        self._proven: set[int] = set()
        self._latest: dict[int, Instance] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def on_event(self, kind: WatchEventKind, instance: Instance) -> None:
        """A worker record changed: applied now if its worker proved itself (or on REMOVED), else
        once it does."""
        worker_id = instance.instance_id
        if kind is WatchEventKind.REMOVED:
            task = self._tasks.pop(worker_id, None)
            if task is not None:
                task.cancel()
            self._latest.pop(worker_id, None)
            self._proven.discard(worker_id)
            self._apply(kind, instance)
            return
        if worker_id in self._proven:
            self._apply(kind, instance)
            return
        self._latest[worker_id] = instance
        if worker_id not in self._tasks:
            self._tasks[worker_id] = asyncio.get_running_loop().create_task(
                self._prove(worker_id), name=f"prove-worker-{worker_id}"
            )

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _prove(self, worker_id: int) -> None:
        warned = False
        while True:
            instance = self._latest[worker_id]
            problem = await self._check(instance)
            if problem is None:
                break
            if not warned:
                warned = True
                log.warning(
                    "worker %d at %s has not proven its record (%s); its model stays unlisted, "
                    "asking again every %gs",
                    worker_id, instance.address, problem, self._retry_every,
                )  # fmt: skip
            await asyncio.sleep(self._retry_every)
        self._tasks.pop(worker_id, None)
        self._proven.add(worker_id)
        if warned:
            log.info("worker %d proved its record; listing its model", worker_id)
        self._apply(WatchEventKind.ADDED, self._latest.pop(worker_id))

    async def _check(self, instance: Instance) -> str | None:
        """None when the worker at the record's address holds a worker certificate and serves the
        model the record names; else what is wrong."""
        try:
            async with self._tls.channel(instance.address, "worker") as channel:
                reply = await worker_pb2_grpc.WorkerServiceStub(channel).Describe(
                    worker_pb2.DescribeRequest(), timeout=self._timeout
                )
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        claimed = instance.model_card.model if instance.model_card is not None else ""
        served = reply.model_card.name
        if claimed and served != claimed:
            return f"it serves {served!r}, its record names {claimed!r}"
        return None
