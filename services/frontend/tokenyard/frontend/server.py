"""Frontend process wiring: discovery feed, model registry, router and worker clients, the KServe
gRPC server (through the service skeleton) and the OpenAI HTTP server, in one event loop.

``/metrics`` is served by the HTTP server, so the skeleton is told not to open a port for it.
Both listeners drain together on shutdown: the HTTP server stops accepting and gives in-flight
requests the grace period while the gRPC server does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from types import TracebackType

from aiohttp import web

from tokenyard.api.kserve.v2 import grpc_service_pb2_grpc
from tokenyard.common.api_keys import ApiKeyError, ApiKeys
from tokenyard.common.discovery import Discovery, DiscoveryError, Instance, WatchEventKind
from tokenyard.common.metrics import Metrics
from tokenyard.common.service import ServiceRuntime, StartupError
from tokenyard.common.tls import PLAINTEXT, Tls
from tokenyard.frontend.auth import ApiKeyInterceptor, http_middleware
from tokenyard.frontend.clients import RouterClient, WorkerClients
from tokenyard.frontend.config import FrontendSettings, WorkerTransport
from tokenyard.frontend.connections import ConnectionOptions, GuardedListener, GuardedSite, connection_limit
from tokenyard.frontend.core import Frontend
from tokenyard.frontend.http_app import HttpOptions, build_app
from tokenyard.frontend.limits import Limits
from tokenyard.frontend.metrics import FrontendMetrics
from tokenyard.frontend.models import ModelRegistry
from tokenyard.frontend.preprocess import Preprocessor
from tokenyard.frontend.readiness import Readiness
from tokenyard.frontend.servicer import SERVICE_NAME, KServeServicer
from tokenyard.frontend.worker_proof import WorkerProof

log = logging.getLogger(__name__)

READY_HEALTH_SERVICE = "tokenyard.frontend.Ready"
"""gRPC health name that answers what ``/health/ready`` answers: SERVING while some router and
some worker answer (readiness probes); the whole server's status ("") stays liveness."""


class DiscoveryFeed:
    """One discovery watch feeding the model registry (workers) and, unless the router addresses
    are fixed, the router client (every router registered)."""

    def __init__(
        self, discovery: Discovery, models: ModelRegistry, router: RouterClient | None, tls: Tls = PLAINTEXT
    ) -> None:
        self._discovery = discovery
        self._models = models
        self._router = router
        # With mTLS a worker's record reaches the model registry once the worker proved it.
        self._proof = WorkerProof(tls, models.apply) if tls.enabled else None
        self._routers: dict[int, str] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="discovery-feed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._proof is not None:
            await self._proof.close()

    def apply(self, kind: WatchEventKind, instance: Instance) -> None:
        if instance.service == "worker":
            if self._proof is not None:
                self._proof.on_event(kind, instance)
            else:
                self._models.apply(kind, instance)
        elif instance.service == "router" and self._router is not None:
            old = self._routers.pop(instance.instance_id, None)
            if kind is not WatchEventKind.REMOVED:
                self._routers[instance.instance_id] = instance.address
                self._router.add(instance.address)
            # A router restarted on a fixed port registers the same address under a new id.
            if old is not None and old not in self._routers.values():
                self._router.remove(old)

    async def _run(self) -> None:
        while True:
            try:
                async for event in self._discovery.watch():
                    self.apply(event.kind, event.instance)
            except DiscoveryError as exc:
                log.warning("discovery watch failed, retrying in 1s: %s", exc)
                await asyncio.sleep(1.0)


def bind_http(settings: FrontendSettings) -> socket.socket:
    """The OpenAI HTTP listening socket, bound before anything else starts so that a busy port
    is a one-line startup error."""
    host, port = settings.host, settings.http_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Rebinding right after a restart (sockets in TIME_WAIT) is fine; a live listener still
    # makes bind() fail, as SO_REUSEADDR does not imply SO_REUSEPORT on Linux.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.http_reuse_port:
        # Several frontend processes on one port: the kernel spreads the connections over them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == 98 else (exc.strerror or str(exc))
        raise StartupError(
            f"cannot listen on {host}:{port} (--http-port / TOKENYARD_FRONTEND_HTTP_PORT, "
            f"--host / TOKENYARD_FRONTEND_HOST): {reason}"
        ) from None
    sock.setblocking(False)
    return sock


class FrontendServer:
    """One frontend, serving from ``__aenter__`` until ``__aexit__``."""

    def __init__(self, settings: FrontendSettings) -> None:
        self.settings = settings
        self._http_sock = bind_http(settings)
        self.http_port: int = self._http_sock.getsockname()[1]
        metrics = Metrics("frontend")
        try:
            self.api_keys = ApiKeys.load(settings.api_keys, settings.api_keys_file)
        except ApiKeyError as exc:
            self._http_sock.close()
            raise StartupError(f"{exc} (--api-keys-file / --api-keys)") from None
        auth = [ApiKeyInterceptor(self.api_keys, settings.auth_probes)] if self.api_keys.enabled else []
        try:
            self.runtime = ServiceRuntime(
                settings,
                service="frontend",
                metrics=metrics,
                metrics_port=None,
                metrics_address=f"{settings.advertised_host()}:{self.http_port}",
                # Its gRPC port serves clients (KServe, API keys), not other services.
                peer_auth=False,
                interceptors=auth,
                server_options=[
                    # HTTP/2 streams one client connection may have open at once.
                    ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
                    ("grpc.max_receive_message_length", settings.max_body_bytes),
                ],
            )
        except BaseException:
            self._http_sock.close()
            raise
        self.models = ModelRegistry()
        self.preprocessor = Preprocessor()
        self.router = RouterClient(settings.router_addresses(), tls=self.runtime.tls)
        self.workers = WorkerClients(self.runtime.tls, mux=settings.worker_transport is WorkerTransport.MUX)
        self.frontend = Frontend(
            self.models,
            self.preprocessor,
            self.router,
            self.workers,
            FrontendMetrics(metrics.registry),
            migration_limit=settings.migration_limit,
            replacement_wait=settings.migration_replacement_wait,
            limits=Limits(
                max_prompt_tokens=settings.max_prompt_tokens,
                max_output_tokens=settings.max_output_tokens,
                max_inflight_requests=settings.max_inflight_requests,
                request_timeout=settings.request_timeout,
                default_max_tokens=settings.default_max_tokens,
            ),
            disagg=settings.disagg(),
        )
        self._ready = [False]
        self.listener = GuardedListener(
            self._http_sock,
            ConnectionOptions(
                max_connections=connection_limit(settings.http_max_connections),
                header_timeout=settings.http_header_timeout,
                idle_timeout=settings.http_idle_timeout,
            ),
        )
        self.readiness = Readiness(
            lambda: self.router.addresses,
            self._worker_addresses,
            lambda address, service: self.runtime.tls.channel(address, service),
        )
        # /health/ready for probes that speak gRPC (Kubernetes, compose): the same answer.
        self.runtime.add_health_check(READY_HEALTH_SERVICE, self._ready_now)
        self._runner = web.AppRunner(
            build_app(
                self.frontend,
                metrics,
                self._ready,
                HttpOptions(
                    overload_status=settings.overload_status,
                    max_body_bytes=settings.max_body_bytes,
                    body_timeout=settings.http_body_timeout,
                ),
                listener=self.listener,
                readiness=self.readiness,
            ),
            # A client that closes its connection cancels its handler, and so its worker call.
            handler_cancellation=True,
            shutdown_timeout=settings.grace_period,
            # aiohttp's own idle timer, behind the listener's (which also covers a first request).
            keepalive_timeout=settings.http_idle_timeout,
            access_log=None,
        )
        self._feed = DiscoveryFeed(
            self.runtime.discovery, self.models, None if settings.router else self.router, self.runtime.tls
        )
        self._http_closing: asyncio.Task[None] | None = None

    async def _ready_now(self) -> bool:
        return (await self.readiness.state()).ready

    def _worker_addresses(self) -> list[str]:
        """Workers that serve clients (not prefill-only ones), of every model."""
        out: list[str] = []
        for name in self.models.models():
            served = self.models.get(name)
            if served is not None:
                out.extend(i.address for i in served.instances.values())
        return out

    @property
    def address(self) -> str:
        """host:port of the KServe gRPC server."""
        return self.runtime.address

    async def __aenter__(self) -> FrontendServer:
        await self.runtime.__aenter__()
        try:
            await self._start()
        except BaseException as exc:
            await self.runtime.__aexit__(type(exc), exc, exc.__traceback__)
            self._http_sock.close()
            raise
        return self

    async def _start(self) -> None:
        self.models.on_model(lambda card: self.preprocessor.prefetch(card.tokenizer))
        self.models.on_worker_left(lambda instance: self.workers.forget(instance.address))
        self.runtime.add_servicer(
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            KServeServicer(self.frontend, max_requests_per_stream=self.settings.max_streams_per_connection),
            SERVICE_NAME,
        )
        if self.api_keys.enabled:
            # Right inside the connection marks (index 0, present since the app has a listener):
            # they must see every request, or the header timer keeps running after a 401 and
            # later writes a 408 nobody asked for onto the kept-alive connection. Before anything
            # else: a request without a valid key is answered before its body is read.
            self._runner.app.middlewares.insert(1, http_middleware(self.api_keys, self.settings.auth_probes))
            log.info("client authentication on: %d API key(s)", len(self.api_keys))
        await self._runner.setup()
        self.runtime.on_close(self._close)
        await self.runtime.start()
        site = GuardedSite(self._runner, self.listener)
        await site.start()
        self._feed.start()
        self._ready[0] = True
        self.runtime.set_serving(True)
        log.info(
            "OpenAI HTTP on %s:%d; KServe gRPC on %s",
            self.settings.host,
            self.http_port,
            self.runtime.address,
        )

    def begin_shutdown(self) -> None:
        """Stop taking HTTP requests and drain them, while the skeleton drains gRPC."""
        self._ready[0] = False
        if self._http_closing is None:
            self._http_closing = asyncio.create_task(self._runner.cleanup())

    async def _close(self) -> None:
        self.begin_shutdown()
        assert self._http_closing is not None
        await self._http_closing
        await self._feed.close()
        await self.router.close()
        await self.workers.close()
        self.preprocessor.close()
        await self.readiness.close()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.begin_shutdown()
        try:
            await self.runtime.__aexit__(exc_type, exc, tb)
        finally:
            self._http_sock.close()


async def serve(settings: FrontendSettings) -> None:
    async with FrontendServer(settings) as server:
        await server.runtime.wait_for_shutdown()
