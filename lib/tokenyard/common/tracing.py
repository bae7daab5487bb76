"""OpenTelemetry tracing: a span per RPC, W3C context in gRPC metadata and HTTP headers.

Tracing is on only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. When it is off, :func:`tracer`
returns ``None`` and callers skip span creation altogether, so the hot path pays one attribute
check and nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None
_shutdown: list[Callable[[], object]] = []


def setup_tracing(service: str) -> bool:
    """Install an OTLP exporter when the standard endpoint variable asks for one."""
    global _tracer
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not endpoint:
        _tracer = None
        return False
    # Imported lazily: the SDK and exporter cost start-up time that untraced processes skip.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"tokenyard-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _shutdown.append(provider.shutdown)
    _tracer = trace.get_tracer("tokenyard")
    log.info("tracing on: exporting spans to %s", endpoint)
    return True


def tracer() -> trace.Tracer | None:
    return _tracer


def use_tracer(value: trace.Tracer | None) -> None:
    """Install a tracer directly (tests use an in-memory exporter)."""
    global _tracer
    _tracer = value


def shutdown_tracing() -> None:
    """Flush spans still queued in the batch processor; called once when the process exits."""
    global _tracer
    while _shutdown:
        _shutdown.pop()()
    _tracer = None


class _MetadataGetter(Getter[Iterable[tuple[str, str | bytes]]]):
    def get(self, carrier: Iterable[tuple[str, str | bytes]], key: str) -> list[str] | None:
        values = [v if isinstance(v, str) else v.decode() for k, v in carrier if k == key]
        return values or None

    def keys(self, carrier: Iterable[tuple[str, str | bytes]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


def extract_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    return _PROPAGATOR.extract(list(metadata or ()), getter=_GETTER)


def extract_from_headers(headers: Mapping[str, str]) -> Context:
    return _PROPAGATOR.extract({k.lower(): v for k, v in headers.items()})


def inject_headers() -> dict[str, str]:
    """W3C trace headers for the current span (empty when tracing is off)."""
    if _tracer is None:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier
