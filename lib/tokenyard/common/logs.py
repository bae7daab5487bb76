"""Logging, configured once in ``main()``, with the request id of the current RPC on every line.

JSON lines (``--log-format json``) carry what a log store needs to join a line to the rest of
its request: ``service`` (the OpenTelemetry ``service.name``, so logs and traces name a process
alike), ``instance`` (the discovery instance id), ``request_id``, and, while a sampled span is
current, ``trace_id`` and ``span_id`` in the W3C hex form that trace stores index.

A line logged outside the request's context (the frontend's end-of-request line runs after the
HTTP handler's scope closed) passes the ids explicitly: ``log.info(..., extra=log_fields(...))``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from opentelemetry import trace

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("tokenyard_request_id", default="-")

_service = "tokenyard"
_instance = "-"


def set_instance(instance_id: int | str) -> None:
    """Name this process's discovery instance on every later line (the service skeleton calls it)."""
    global _instance
    _instance = str(instance_id)


def span_ids(span: trace.Span | None = None) -> tuple[str, str] | None:
    """``(trace_id, span_id)`` in W3C hex of ``span`` (default: the current one), None when invalid."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def log_fields(request_id: str, span: trace.Span | None = None) -> dict[str, str]:
    """``extra=`` for a line about a request logged outside its context."""
    fields = {"request_id": request_id}
    ids = span_ids(span) if span is not None else None
    if ids is not None:
        fields["trace_id"], fields["span_id"] = ids
    return fields


class _ContextFilter(logging.Filter):
    """Stamps the ids of the current context on a record, keeping any passed in ``extra``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "trace_id"):
            ids = span_ids()
            if ids is not None:
                record.trace_id, record.span_id = ids
        record.service = _service
        record.instance = _instance
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": getattr(record, "service", _service),
            "instance": getattr(record, "instance", _instance),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            doc["trace_id"] = trace_id
            doc["span_id"] = getattr(record, "span_id", "")
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: str = "info", fmt: str = "text", service: str = "tokenyard") -> None:
    """``service`` is the name JSON lines carry: pass the trace resource's ``service.name``."""
    global _service
    _service = service
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)-7s {service} %(name)s [%(request_id)s] %(message)s",
                datefmt="%H:%M:%S",
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own aio logger reports every cancelled stream at ERROR; that is normal traffic here.
    logging.getLogger("grpc._cython.cygrpc").setLevel(logging.WARNING)
