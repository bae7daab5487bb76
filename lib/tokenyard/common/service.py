"""The service skeleton: one ``grpc.aio`` server with health, reflection, metrics and discovery.

Every service's ``serve()`` follows the same shape::

    async with ServiceRuntime(settings, service="router") as runtime:
        runtime.add_servicer(router_pb2_grpc.add_RouterServiceServicer_to_server, servicer, SERVICE_NAME)
        await runtime.start()          # bind, serve /metrics, register in discovery
        runtime.set_serving(True)      # health means ready
        await runtime.wait_for_shutdown()
    # leaving the block: NOT_SERVING, deregister, stop(grace), close

Shutdown deregisters *before* ``server.stop(grace)`` so that routers and frontends stop picking
this instance while its in-flight calls drain, instead of sending new work into the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenyard.common.access import AccessInterceptor
from tokenyard.common.discovery import (
    Discovery,
    DiscoveryError,
    Instance,
    ModelCard,
    new_instance_id,
    open_discovery,
)
from tokenyard.common.interceptors import ServiceInterceptor
from tokenyard.common.logs import set_instance as set_log_instance
from tokenyard.common.metrics import Metrics
from tokenyard.common.settings import ServiceSettings
from tokenyard.common.tls import Tls, TlsError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    # gRPC enables SO_REUSEPORT by default, which lets a second process bind a port that is
    # already serving and silently split its traffic. A busy port must be an error instead.
    ("grpc.so_reuseport", 0),
    # Prompts of long-context models and KV snapshots exceed the 4 MiB default.
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Keep idle streams (KV event subscriptions) alive through NATs and proxies, and find a peer
    # that vanished without closing (a killed host, a pulled cable) within 30 s.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A client that pings more often than the policy above allows is told to go away after a few
    # strikes instead of costing a wakeup per ping.
    ("grpc.http2.max_ping_strikes", 3),
    # Connections without a call for 10 minutes are closed (GOAWAY; clients reconnect on their
    # next call): idle connections opened and forgotten must not accumulate until descriptors
    # run out. Long calls (streams) are not idle, so this never cuts one.
    ("grpc.max_connection_idle_ms", 600_000),
)


def merged_options(*groups: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Server options where a later group overrides an earlier one: gRPC itself honours the
    *first* of two options with the same key, which would silently keep the shared default."""
    merged: dict[str, Any] = {}
    for group in groups:
        merged.update(group)
    return list(merged.items())


class StartupError(Exception):
    """The service cannot start; the message names the setting to fix (one line)."""


AddServicer = Callable[[Any, grpc.aio.Server], None]


class ServiceRuntime:
    def __init__(
        self,
        settings: ServiceSettings,
        *,
        service: str,
        role: str = "",
        model_card: ModelCard | None = None,
        metadata: dict[str, str] | None = None,
        metrics: Metrics | None = None,
        metrics_port: int | None = None,
        metrics_address: str | None = None,
        register: bool = True,
        listen_address: str | None = None,
        server_options: Sequence[tuple[str, Any]] = (),
        peer_auth: bool = True,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
    ) -> None:
        self.settings = settings
        self.service = service
        self.role = role
        self.model_card = model_card
        self.metadata = dict(metadata or {})
        self.metrics = metrics or Metrics(service)
        self.instance_id = new_instance_id()
        set_log_instance(self.instance_id)
        self.port = 0
        # None: this service exposes /metrics elsewhere (the frontend serves it on its HTTP port).
        self._metrics_port_setting = metrics_port
        self.metrics_port = 0
        self._metrics_address = metrics_address
        env = f"TOKENYARD_{service.upper()}_DISCOVERY"
        try:
            # Opening is cheap and connects lazily, so services can wire watches before start().
            self.discovery: Discovery = open_discovery(settings.discovery, ttl=settings.discovery_ttl)
        except DiscoveryError as exc:
            raise StartupError(f"discovery {settings.discovery!r} (--discovery / {env}): {exc}") from None
        self._discovery_open = True
        self._register = register
        # A unix:/path address (gms) replaces host:port for both binding and advertising.
        self._listen_override = listen_address
        try:
            # The process's certificate: its clients present it to other services whatever the
            # port serves.
            self.tls = Tls.from_paths(settings.tls_ca, settings.tls_cert, settings.tls_key)
        except TlsError as exc:
            raise StartupError(f"{exc} (TOKENYARD_{service.upper()}_TLS_* / TOKENYARD_TLS_*)") from None
        identity = self.tls.files.identity if self.tls.files is not None else service
        if identity != service and service != "gms":
            # Not fatal (a certificate may be shared while migrating), but peers will refuse it.
            log.warning(
                "the certificate (--tls-cert) names %r, not %r: peers that dial a %s refuse this process",
                identity,
                service,
                service,
            )
        # peer_auth=False: the port serves clients, not services (the frontend's KServe port,
        # which takes API keys; the gms's Unix socket, guarded by its file mode): no mTLS there.
        self._server_tls = self.tls if peer_auth else None
        self._extra_interceptors = list(interceptors)
        # Later options win: a service may override the shared defaults (message sizes).
        self._server_options = merged_options(SERVER_OPTIONS, server_options)
        self._servicers: list[tuple[AddServicer, Any, str]] = []
        self._health = _Health()
        self._server: grpc.aio.Server | None = None
        self._stop = asyncio.Event()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._instance: Instance | None = None

    # ---- wiring -------------------------------------------------------------------------------

    def add_servicer(self, add: AddServicer, servicer: Any, full_name: str) -> None:
        """Register a servicer; ``full_name`` (from the proto DESCRIPTOR) goes to reflection and health."""
        self._servicers.append((add, servicer, full_name))

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``closer`` at shutdown, after the server stopped (engines, clients, tasks)."""
        self._closers.append(closer)

    def _listen_address(self) -> str:
        return self._listen_override or f"{_bind_host(self.settings.host)}:{self.settings.port}"

    @property
    def address(self) -> str:
        if self._listen_override:
            return self._listen_override
        return f"{self.settings.advertised_host()}:{self.port}"

    @property
    def service_names(self) -> list[str]:
        return [name for _, _, name in self._servicers]

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        env = f"TOKENYARD_{self.service.upper()}"
        interceptors: list[grpc.aio.ServerInterceptor] = [ServiceInterceptor(self.service, self.metrics)]  # type: ignore[type-arg]
        credentials = self._server_tls.server_credentials() if self._server_tls is not None else None
        if credentials is not None:
            # Inside the metrics interceptor, so refused calls are counted with their status.
            interceptors.append(AccessInterceptor(self.service))
        # The service's own (client authentication), innermost: refusals are counted too.
        interceptors.extend(self._extra_interceptors)
        server = grpc.aio.server(interceptors=interceptors, options=self._server_options)
        for add, servicer, _ in self._servicers:
            add(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        try:
            if credentials is not None:
                self.port = server.add_secure_port(self._listen_address(), credentials)
            else:
                self.port = server.add_insecure_port(self._listen_address())
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen on {s.host}:{s.port} (--port / {env}_PORT, --host / {env}_HOST): "
                f"{_bind_reason(exc)}"
            ) from None
        self._server = server
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        if self._metrics_port_setting is not None:
            try:
                self.metrics_port = self.metrics.serve(s.host, self._metrics_port_setting)
            except OSError as exc:
                await server.stop(None)
                raise StartupError(
                    f"cannot serve /metrics on {s.host}:{self._metrics_port_setting} "
                    f"(--metrics-port / {env}_METRICS_PORT): {exc.strerror or exc}"
                ) from None
        log.info(
            "%s listening on %s (gRPC%s), /metrics on %s; instance %d",
            self.service,
            self.address,
            ", mTLS" if credentials is not None else "",
            f"{s.host}:{self.metrics_port}"
            if self._metrics_port_setting is not None
            else self._metrics_address,
            self.instance_id,
        )
        if self._register:
            await self._register_instance()

    async def _register_instance(self) -> None:
        s = self.settings
        try:
            self._instance = Instance(
                instance_id=self.instance_id,
                service=self.service,
                role=self.role,
                address=self.address,
                metrics_address=self._metrics_address or f"{s.advertised_host()}:{self.metrics_port}",
                model_card=self.model_card,
                metadata=self.metadata,
            )
            await self.discovery.register(self._instance)
        except DiscoveryError as exc:
            await self._teardown(grace=0)
            env = f"TOKENYARD_{self.service.upper()}_DISCOVERY"
            raise StartupError(f"discovery {s.discovery!r} (--discovery / {env}): {exc}") from None
        log.info("registered as %s %d at %s in %s", self.service, self.instance_id, self.address, s.discovery)

    async def deregister(self) -> None:
        """Leave discovery now (drain, shutdown); safe to call more than once."""
        if self._instance is None:
            return
        instance, self._instance = self._instance, None
        try:
            await self.discovery.deregister(instance.instance_id)
        except DiscoveryError as exc:
            log.warning("could not deregister (the lease will expire): %s", exc)
        else:
            log.info("deregistered %s %d", self.service, instance.instance_id)

    def add_health_check(self, name: str, check: Callable[[], Awaitable[bool]]) -> None:
        """A health service ``name`` whose status is ``check()``, evaluated when asked (and
        NOT_SERVING whenever the whole server is): for a probe that asks more than whether the
        process serves, as the frontend's readiness does."""
        self._health.dynamic[name] = check

    def set_serving(self, serving: bool) -> None:
        """Health means ready: flip every service of this process at once."""
        self._health.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.metrics.up.labels(self.service).set(1 if serving else 0)
        task = asyncio.get_running_loop().create_task(self._set_all(status))
        task.add_done_callback(_log_task_error)

    async def _set_all(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *self.service_names, *self._health.dynamic):
            await self._health.set(name, status)

    def request_shutdown(self) -> None:
        self._stop.set()

    async def wait_for_shutdown(self) -> None:
        """Block until SIGTERM or SIGINT (or :meth:`request_shutdown`)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        log.info("shutting down %s (grace %.1fs)", self.service, self.settings.grace_period)

    async def _teardown(self, grace: float | None) -> None:
        self._health.serving = False
        if self._server is not None:
            await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
            self.metrics.up.labels(self.service).set(0)
        await self.deregister()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception:
                log.exception("error while closing")
        self._closers.clear()
        # Last: background tasks (watches) may use discovery until their closers ran.
        if self._discovery_open:
            try:
                await self.discovery.close()
            except DiscoveryError as exc:
                log.warning("closing discovery: %s", exc)
            self._discovery_open = False
        self.metrics.close()

    async def __aenter__(self) -> ServiceRuntime:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._teardown(grace=self.settings.grace_period)


def _bind_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _bind_reason(exc: RuntimeError) -> str:
    text = str(exc)
    if "Address already in use" in text or "Failed to bind" in text:
        return "address already in use or not available"
    return text.splitlines()[0] if text else "bind failed"


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("health update failed: %s", task.exception())


class _Health(health.aio.HealthServicer):  # type: ignore[misc,name-defined]  # grpc_health leaves it untyped
    """gRPC health with, beside the statuses set, names whose status is computed when checked."""

    def __init__(self) -> None:
        super().__init__()
        self.dynamic: dict[str, Callable[[], Awaitable[bool]]] = {}
        self.serving = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        check = self.dynamic.get(request.service)
        if check is None:
            return await super().Check(request, context)
        ok = self.serving and await check()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        # Watchers of the name see what the last check found.
        await self.set(request.service, status)
        return health_pb2.HealthCheckResponse(status=status)
