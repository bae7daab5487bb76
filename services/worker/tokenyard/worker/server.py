"""Worker process wiring: engine, intake, event streams, the gRPC service, discovery.

Start order: the event hubs subscribe to the engine before it starts (so the KV buffer holds
event 0); the engine starts (loads its model); only then is the model card known, the server
bound and the instance registered; health turns SERVING last.

Stop order (SIGTERM): new Generate calls are refused, event streams end (they would otherwise
hold the grace period open), then the shared skeleton turns health NOT_SERVING, deregisters, gives
in-flight calls the grace period, and the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from tokenyard.api.worker.v1 import worker_pb2_grpc
from tokenyard.common.errors import TokenyardError
from tokenyard.common.service import ServiceRuntime, StartupError
from tokenyard.worker.config import WorkerSettings
from tokenyard.worker.description import WorkerDescription
from tokenyard.worker.engines import create_engine
from tokenyard.worker.engines.base import Engine, GuidedDecoder, KvBlockTransfer
from tokenyard.worker.forward_pass import ForwardPassHub
from tokenyard.worker.intake import Intake
from tokenyard.worker.kv_fetch import KvFetcher
from tokenyard.worker.kv_stream import KvEventHub
from tokenyard.worker.metrics import WorkerMetrics
from tokenyard.worker.servicer import SERVICE_NAME, WorkerServicer
from tokenyard.worker.standby import StandbyLock

log = logging.getLogger(__name__)


class WorkerServer:
    """One worker, serving from ``__aenter__`` until ``__aexit__``."""

    def __init__(self, settings: WorkerSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else create_engine(settings)
        self.runtime = ServiceRuntime(
            settings, service="worker", role=settings.role.value, metrics_port=settings.metrics_port
        )
        self.metrics = WorkerMetrics(self.runtime.metrics)
        self.kv_events = KvEventHub(
            self.engine,
            buffer_size=settings.kv_event_buffer,
            queue_size=settings.kv_subscriber_queue,
            metrics=self.metrics,
        )
        self.forward_passes = ForwardPassHub(self.engine)
        self._intake: Intake | None = None
        self._servicer: WorkerServicer | None = None
        self._ticker: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.runtime.address

    @property
    def intake(self) -> Intake:
        if self._intake is None:
            raise RuntimeError("the worker is not started")
        return self._intake

    async def __aenter__(self) -> WorkerServer:
        await self.runtime.__aenter__()
        try:
            await self._start()
        except BaseException as exc:
            await self.runtime.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def _start(self) -> None:
        s = self.settings
        try:
            await self.engine.start()
        except (TokenyardError, OSError, ValueError) as exc:
            raise StartupError(
                f"the {s.engine.value} engine failed to start (--engine / TOKENYARD_WORKER_ENGINE): {exc}"
            ) from None
        self.runtime.on_close(self.engine.stop)
        info = self.engine.info()
        guided_kinds = self.engine.guided_kinds() if isinstance(self.engine, GuidedDecoder) else ()
        description = WorkerDescription(
            worker_id=self.runtime.instance_id,
            role=s.role.value,
            model=s.model,
            tokenizer=s.tokenizer,
            engine=info,
            reasoning_parser=s.reasoning_parser,
            tool_call_parser=s.tool_call_parser,
            structured_output=tuple(k.value for k in guided_kinds),
        )
        self.runtime.model_card = description.model_card()
        fetcher = None
        if isinstance(self.engine, KvBlockTransfer):
            # Decode requests pull their prompt's KV from prefill workers over these channels.
            fetcher = KvFetcher(timeout_s=s.kv_fetch_timeout, tls=self.runtime.tls)
            self.runtime.on_close(fetcher.aclose)
        intake = self._intake = Intake(
            self.engine,
            info,
            model=s.model,
            max_in_flight=s.max_in_flight,
            metrics=self.metrics,
            fetcher=fetcher,
        )
        intake.on_drain(self._leave)
        self.runtime.on_close(intake.aclose)
        servicer = self._servicer = WorkerServicer(
            engine=self.engine,
            intake=intake,
            kv_events=self.kv_events,
            forward_passes=self.forward_passes,
            description=description,
            metrics=self.metrics,
        )
        self.runtime.add_servicer(worker_pb2_grpc.add_WorkerServiceServicer_to_server, servicer, SERVICE_NAME)
        if s.standby_lock:
            # A standby is ready to serve but neither binds nor registers until it holds the lock.
            standby = StandbyLock(s.standby_lock)
            await standby.acquire()
            self.runtime.on_close(_async(standby.release))
        await self.runtime.start()
        intake.open(self.runtime.instance_id, self.runtime.address)
        self._ticker = asyncio.create_task(self._tick_forever(), name="worker-load-ticker")
        self.runtime.on_close(self._stop_ticker)
        self.runtime.set_serving(True)
        log.info(
            "worker serving %r (%s engine, %s role, block size %d, context %d, %d KV blocks x %d ranks)",
            s.model,
            info.kind,
            s.role.value,
            info.block_size,
            info.context_length,
            info.total_kv_blocks,
            info.dp_size,
        )

    async def _leave(self) -> None:
        """Drain hook: stop being picked for new work."""
        self.runtime.set_serving(False)
        await self.runtime.deregister()

    async def _tick_forever(self) -> None:
        """Load snapshots for event streams and metrics, idle heartbeats for the planner."""
        while True:
            await asyncio.sleep(self.settings.load_interval)
            try:
                loads = self.engine.load()
                self.kv_events.publish_loads(loads)
                self.metrics.observe_load(loads)
                if isinstance(self.engine, KvBlockTransfer):
                    self.metrics.observe_transfer_stats(self.engine.kv_transfer_stats())
                self.forward_passes.heartbeat()
            except Exception:
                log.exception("load sampling failed")

    async def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._intake is not None:
            self._intake.close()
        if self._servicer is not None:
            self._servicer.close()
        self.kv_events.close()
        self.forward_passes.close()
        await self.runtime.__aexit__(exc_type, exc, tb)


def _async(release: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def closer() -> None:
        release()

    return closer


async def serve(settings: WorkerSettings) -> None:
    async with WorkerServer(settings) as worker:
        await worker.runtime.wait_for_shutdown()
