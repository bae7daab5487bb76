"""OpenTelemetry tracing: a span per RPC, W3C context in gRPC metadata and HTTP headers.

Tracing is on only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. When it is off, :func:`tracer`
returns ``None`` and callers skip span creation altogether, so the hot path pays one attribute
check and nothing else.

The resource follows the standard variables: ``OTEL_SERVICE_NAME`` (else ``service.name`` in
``OTEL_RESOURCE_ATTRIBUTES``, else ``tokenyard-<service>``) names the process, and every other
attribute of ``OTEL_RESOURCE_ATTRIBUTES`` (``deployment.environment=prod,k8s.pod.name=...``) is
kept. Logs carry the same name (:func:`service_name`), so a log line and a span name one process
the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None
_shutdown: list[Callable[[], object]] = []


def _env_service_name() -> str:
    """The ``service.name`` the standard variables set, or "" (the SDK's own rule, without the SDK)."""
    name = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    if name:
        return name
    for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "service.name" and value.strip():
            return unquote(value.strip())
    return ""


def service_name(service: str) -> str:
    """The process's ``service.name``: from the OTel variables, else ``tokenyard-<service>``."""
    return _env_service_name() or f"tokenyard-{service}"


def build_resource(service: str) -> Resource:
    """The process's resource: the OTel variables' attributes, plus defaults for what they leave unset."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    # Attributes given to Resource.create beat the environment's: pass only what it leaves unset.
    from_env = OTELResourceDetector().detect().attributes
    defaults = {"service.name": service_name(service), "service.namespace": "tokenyard"}
    return Resource.create({k: v for k, v in defaults.items() if k not in from_env})


def setup_tracing(service: str) -> bool:
    """Install an OTLP exporter when the standard endpoint variable asks for one."""
    global _tracer
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not endpoint:
        _tracer = None
        return False
    # Imported lazily: the SDK and exporter cost start-up time that untraced processes skip.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=build_resource(service))
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
