"""Prometheus metrics, one registry per process.

Each service owns a :class:`Metrics` with a private ``CollectorRegistry`` instead of the global
default one, so that several services (or several test servers) in one interpreter never collide
on metric names, and ``/metrics`` shows exactly what this service exports.
"""

from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)

# RPC latencies span sub-millisecond routing decisions to minute-long generations.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Fail on a busy port instead of sharing it (SO_REUSEADDR is fine: it only skips TIME_WAIT).
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would flood stderr."""


class Metrics:
    """The registry of one service plus the RPC metrics that every service exports."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.rpc_requests = Counter(
            "tokenyard_rpc_requests_total",
            "RPCs handled, by method and final status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "tokenyard_rpc_duration_seconds",
            "Time from RPC start to its last message, by method.",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rpc_in_flight = Gauge(
            "tokenyard_rpc_in_flight",
            "RPCs currently being handled.",
            ["service"],
            registry=self.registry,
        )
        self.up = Gauge(
            "tokenyard_up", "1 while the service reports SERVING.", ["service"], registry=self.registry
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on a daemon thread; returns the bound port."""
        server = make_server(host, port, make_wsgi_app(self.registry), _ThreadingWSGIServer, _QuietHandler)
        # A short poll interval keeps close() quick: shutdown() waits for the next poll.
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="metrics-http", daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
