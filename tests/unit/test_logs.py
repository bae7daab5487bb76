"""JSON log lines carry what joins them to their trace; the OTel variables name the process."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tokenyard.common import logs, tracing

pytestmark = pytest.mark.unit


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.configure_logging("debug", "json", "tokenyard-router")
    stream = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logs.set_instance(1234)
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)
    logs.set_instance("-")


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_outside_any_request_names_the_process_only(captured: io.StringIO) -> None:
    logging.getLogger("t").info("hello %s", "there")
    (line,) = lines(captured)
    assert line["service"] == "tokenyard-router" and line["instance"] == "1234"
    assert line["request_id"] == "-" and line["msg"] == "hello there"
    assert "trace_id" not in line and "span_id" not in line


def test_a_line_inside_a_span_carries_its_ids(captured: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("test")
    token = logs.request_id_var.set("req-1")
    try:
        with tracer.start_as_current_span("work") as span:
            logging.getLogger("t").warning("inside")
            ctx = span.get_span_context()
    finally:
        logs.request_id_var.reset(token)
    (line,) = lines(captured)
    assert line["request_id"] == "req-1"
    assert line["trace_id"] == f"{ctx.trace_id:032x}" and line["span_id"] == f"{ctx.span_id:016x}"


def test_ids_passed_explicitly_win(captured: io.StringIO) -> None:
    span = TracerProvider().get_tracer("test").start_span("ended")
    span.end()
    logging.getLogger("t").debug("after the scope", extra=logs.log_fields("req-2", span))
    logging.getLogger("t").debug("no span", extra=logs.log_fields("req-3"))
    first, second = lines(captured)
    assert first["request_id"] == "req-2" and first["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert second["request_id"] == "req-3" and "trace_id" not in second
    assert logs.span_ids(trace.INVALID_SPAN) is None


def test_service_name_follows_the_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert tracing.service_name("router") == "tokenyard-router"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod, service.name=edge%20router")
    assert tracing.service_name("router") == "edge router"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-a")
    assert tracing.service_name("router") == "router-a"


def test_the_resource_keeps_the_environments_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=w-0,service.namespace=prod")
    attributes = tracing.build_resource("worker").attributes
    assert attributes["service.name"] == "tokenyard-worker"
    assert attributes["k8s.pod.name"] == "w-0"
    assert attributes["service.namespace"] == "prod"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "pool-a")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "")
    attributes = tracing.build_resource("worker").attributes
    assert attributes["service.name"] == "pool-a" and attributes["service.namespace"] == "tokenyard"
