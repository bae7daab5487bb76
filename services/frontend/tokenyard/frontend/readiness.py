"""Whether this frontend can serve a request now: readiness, apart from liveness.

Ready means some router and some worker (one that serves clients) answer their gRPC health check
with SERVING. Checks run when asked, at most once per ``ttl`` seconds (a load balancer polling
every instance must not turn into a health-check storm), each bounded by ``timeout``; channels are
kept per address and closed when the address leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ChannelFactory = Callable[[str, str], grpc.aio.Channel]


@dataclass(frozen=True, slots=True)
class ReadyState:
    ready: bool
    routers: int
    workers: int
    reason: str


class Readiness:
    def __init__(
        self,
        routers: Callable[[], Iterable[str]],
        workers: Callable[[], Iterable[str]],
        channel: ChannelFactory,
        *,
        ttl: float = 1.0,
        timeout: float = 1.0,
    ) -> None:
        self._routers = routers
        self._workers = workers
        self._channel = channel
        self._ttl = ttl
        self._timeout = timeout
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._last: ReadyState | None = None
        self._at = -float("inf")
        self._lock = asyncio.Lock()

    async def state(self) -> ReadyState:
        async with self._lock:
            if self._last is not None and time.monotonic() - self._at < self._ttl:
                return self._last
            routers = sorted(set(self._routers()))
            workers = sorted(set(self._workers()))
            self._forget({("router", a) for a in routers} | {("worker", a) for a in workers})
            up_routers, up_workers = await asyncio.gather(
                self._count("router", routers), self._count("worker", workers)
            )
            if not routers:
                reason = "no router is known"
            elif not up_routers:
                reason = f"none of {len(routers)} router(s) answers"
            elif not workers:
                reason = "no worker is registered"
            elif not up_workers:
                reason = f"none of {len(workers)} worker(s) answers"
            else:
                reason = ""
            self._last = ReadyState(not reason, up_routers, up_workers, reason)
            self._at = time.monotonic()
            return self._last

    async def _count(self, service: str, addresses: list[str]) -> int:
        results = await asyncio.gather(*(self._serving(service, a) for a in addresses))
        return sum(results)

    async def _serving(self, service: str, address: str) -> bool:
        key = (service, address)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = self._channel(address, service)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _forget(self, keep: set[tuple[str, str]]) -> None:
        for key in [k for k in self._channels if k not in keep]:
            channel = self._channels.pop(key)
            task = asyncio.get_running_loop().create_task(channel.close(None))
            task.add_done_callback(_ignore)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close(None)


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
