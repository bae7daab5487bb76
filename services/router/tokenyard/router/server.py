"""Router process wiring: discovery watch, active-request expiry, the gRPC service."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tokenyard.common.discovery import Instance, WatchEventKind
from tokenyard.common.service import ServiceRuntime
from tokenyard.router.active import ActiveRequests
from tokenyard.router.config import RouterSettings
from tokenyard.router.servicer import SERVICE_NAME, RouterServicer
from tokenyard.router.v1 import router_pb2_grpc
from tokenyard.router.workers import WorkerSet, WorkerWatch

log = logging.getLogger(__name__)


async def _expire_forever(active: ActiveRequests, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        if gone := active.expire():
            log.warning("forgot %d routed requests whose end was never notified", gone)


async def serve(settings: RouterSettings) -> None:
    async with ServiceRuntime(settings, service="router", metrics_port=settings.metrics_port) as runtime:
        workers = WorkerSet()
        active = ActiveRequests(settings.active_request_expiry)

        def on_worker_change(kind: WatchEventKind, instance: Instance) -> None:
            if kind is WatchEventKind.REMOVED:
                active.drop_worker(instance.instance_id)

        workers.on_change(on_worker_change)
        servicer = RouterServicer(workers, active, settings.mode.value)
        runtime.add_servicer(router_pb2_grpc.add_RouterServiceServicer_to_server, servicer, SERVICE_NAME)
        await runtime.start()
        watch = WorkerWatch(runtime.discovery, workers)
        watch.start()
        expiry = asyncio.create_task(_expire_forever(active, min(30.0, settings.active_request_expiry / 2)))

        async def close() -> None:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            await watch.close()

        runtime.on_close(close)
        runtime.set_serving(True)
        await runtime.wait_for_shutdown()
