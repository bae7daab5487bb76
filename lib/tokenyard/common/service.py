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

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    # gRPC enables SO_REUSEPORT by default, which lets a second process bind a port that is
    # already serving and silently split its traffic. A busy port must be an error instead.
    ("grpc.so_reuseport", 0),
    # Prompts of long-context models and KV snapshots exceed the 4 MiB default.
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Keep idle streams (KV event subscriptions) alive through NATs and proxies.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


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
        # Later options win: a service may override the shared defaults (message sizes).
        self._server_options = [*SERVER_OPTIONS, *server_options]
        self._servicers: list[tuple[AddServicer, Any, str]] = []
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
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
        server = grpc.aio.server(
            interceptors=[ServiceInterceptor(self.service, self.metrics)], options=self._server_options
        )
        for add, servicer, _ in self._servicers:
            add(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        try:
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
            "%s listening on %s (gRPC), /metrics on %s; instance %d",
            self.service,
            self.address,
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

    def set_serving(self, serving: bool) -> None:
        """Health means ready: flip every service of this process at once."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.metrics.up.labels(self.service).set(1 if serving else 0)
        task = asyncio.get_running_loop().create_task(self._set_all(status))
        task.add_done_callback(_log_task_error)

    async def _set_all(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *self.service_names):
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
