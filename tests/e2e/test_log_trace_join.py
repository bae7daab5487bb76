"""Logs join traces: a request's JSON log lines in every service carry its trace id and the ids of
spans in that trace, and name their service as the trace resource does (OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES honoured). Spans go to an OTLP receiver inside the test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.e2e.test_router_kv import instances as wait_for_instances
from tests.fixtures.http import frontend_serves
from tests.fixtures.processes import ServiceProcess, ServiceProcessFactory, wait_for_instance
from tokenyard.common.discovery import Instance

pytestmark = pytest.mark.e2e

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Span:
    trace_id: str
    span_id: str
    name: str
    service: str
    resource: dict[str, str]
    attributes: dict[str, str] = field(default_factory=dict)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.spans.append(
                        Span(
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.name,
                            resource.get("service.name", ""),
                            resource,
                            {a.key: a.value.string_value for a in s.attributes},
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server()
    rec = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield rec, port
    await server.stop(None)


def json_lines(proc: ServiceProcess) -> list[dict[str, Any]]:
    lines = []
    for raw in proc.output().splitlines():
        if raw.startswith("{"):
            doc = json.loads(raw)
            assert isinstance(doc, dict)
            lines.append(doc)
    return lines


async def _send_traced_request(http: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if await frontend_serves(session, http, MODEL):
                break
            await asyncio.sleep(0.1)
        # A prompt of several blocks, so that a split deployment hands KV over.
        body = {"model": MODEL, "prompt": "join my logs " * 40, "max_tokens": 3}
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        async with session.post(f"{http}/v1/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()


def _assert_logs_join_the_trace(
    rec: Receiver,
    procs: dict[str, ServiceProcess],
    instances: dict[str, Instance],
    expected_names: dict[str, str],
) -> list[Span]:
    """Every service's JSON log lines carry the request's trace and span ids; returns its spans."""
    spans = [s for s in rec.spans if s.trace_id == TRACE_ID]
    span_ids = {s.span_id: s for s in spans}
    assert {s.service for s in spans} == set(expected_names.values()), [(s.service, s.name) for s in spans]
    root = next(s for s in spans if s.name == "frontend.request")
    request_id = root.attributes["tokenyard.request_id"]

    for name, proc in procs.items():
        lines = json_lines(proc)
        assert lines, f"{name} wrote no JSON log lines:\n{proc.output()[-2000:]}"
        for line in lines:
            assert {"ts", "level", "service", "instance", "logger", "request_id", "msg"} <= set(line), line
            assert line["service"] == expected_names[name], line
        # Once registered, every line names the instance that discovery lists.
        assert lines[-1]["instance"] == str(instances[name].instance_id), lines[-1]
        joined = [line for line in lines if line.get("trace_id") == TRACE_ID]
        assert joined, f"no {name} log line carries trace {TRACE_ID}:\n" + "\n".join(map(str, lines[-20:]))
        for line in joined:
            # Each line points at a span of this trace, exported by the same service.
            span = span_ids.get(line["span_id"])
            assert span is not None, f"{name}: span {line['span_id']} is not in the trace: {line}"
            assert span.service == expected_names[name], (line, span)
            assert line["request_id"] == request_id, line
    return spans


async def test_every_services_log_lines_join_the_requests_trace(
    receiver: tuple[Receiver, int], spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    rec, port = receiver
    url = f"dir://{tmp_path}"
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    logging_flags = ["--log-format", "json", "--log-level", "debug", "--discovery", url]
    base = ["--port", "0", "--metrics-port", "0", *logging_flags]
    # One service named by OTEL_SERVICE_NAME, one by OTEL_RESOURCE_ATTRIBUTES, one by default.
    router = spawn(
        ["router", *base],
        env={
            **otlp,
            "OTEL_SERVICE_NAME": "edge-router",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        },
    )
    worker = spawn(
        ["worker", *base, "--engine", "mocker", "--mocker-speedup-ratio", "0"],
        env={**otlp, "OTEL_RESOURCE_ATTRIBUTES": "service.name=pool-a-worker,k8s.pod.name=w-0"},
    )
    frontend = spawn(["frontend", "--port", "0", "--http-port", "0", *logging_flags], env=otlp)
    instances = {
        "router": await wait_for_instance(url, "router", proc=router),
        "worker": await wait_for_instance(url, "worker", proc=worker),
        "frontend": await wait_for_instance(url, "frontend", proc=frontend),
    }
    await _send_traced_request(f"http://{instances['frontend'].metrics_address}")
    # Spans are flushed at shutdown.
    procs = {"frontend": frontend, "worker": worker, "router": router}
    for proc in procs.values():
        assert await asyncio.to_thread(proc.terminate) == 0

    expected_names = {"frontend": "tokenyard-frontend", "router": "edge-router", "worker": "pool-a-worker"}
    spans = _assert_logs_join_the_trace(rec, procs, instances, expected_names)
    router_span = next(s for s in spans if s.service == "edge-router")
    assert router_span.resource["deployment.environment"] == "test"
    assert router_span.resource["service.namespace"] == "tokenyard"
    worker_span = next(s for s in spans if s.service == "pool-a-worker")
    assert worker_span.resource["k8s.pod.name"] == "w-0"

    # Requests without a caller's traceparent get a trace of their own, and the frontend's line
    # about each names it.
    frontend_lines = json_lines(frontend)
    for warmup in (s for s in rec.spans if s.name == "frontend.request" and s.trace_id != TRACE_ID):
        rid = warmup.attributes["tokenyard.request_id"]
        about = [line for line in frontend_lines if line["request_id"] == rid and "trace_id" in line]
        assert about and all(line["trace_id"] == warmup.trace_id for line in about), rid


async def test_a_split_requests_logs_join_one_trace_across_prefill_and_decode(
    receiver: tuple[Receiver, int], spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    """Disaggregated: the frontend, the router, the prefill worker that computes the prompt and the
    decode worker that pulls its KV and generates all log under the one trace."""
    rec, port = receiver
    url = f"dir://{tmp_path}"
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    logging_flags = ["--log-format", "json", "--log-level", "debug", "--discovery", url]
    base = ["--port", "0", "--metrics-port", "0", *logging_flags]
    mocker = ["--engine", "mocker", "--mocker-speedup-ratio", "0", "--mocker-block-size", "16"]
    router = spawn(["router", *base, "--mode", "kv"], env=otlp)
    prefill = spawn(
        ["worker", *base, "--role", "prefill", *mocker], env={**otlp, "OTEL_SERVICE_NAME": "prefill-worker"}
    )
    decode = spawn(
        ["worker", *base, "--role", "decode", *mocker], env={**otlp, "OTEL_SERVICE_NAME": "decode-worker"}
    )
    frontend = spawn(
        ["frontend", "--port", "0", "--http-port", "0", "--disagg-policy", "always", *logging_flags], env=otlp
    )
    workers = await wait_for_instances(url, "worker", 2, [prefill, decode])
    by_role = {w.model_card.role: w for w in workers if w.model_card is not None}
    instances = {
        "router": await wait_for_instance(url, "router", proc=router),
        "prefill": by_role["prefill"],
        "decode": by_role["decode"],
        "frontend": await wait_for_instance(url, "frontend", proc=frontend),
    }
    await _send_traced_request(f"http://{instances['frontend'].metrics_address}")
    procs = {"frontend": frontend, "prefill": prefill, "decode": decode, "router": router}
    for proc in procs.values():
        assert await asyncio.to_thread(proc.terminate) == 0

    expected_names = {
        "frontend": "tokenyard-frontend",
        "router": "tokenyard-router",
        "prefill": "prefill-worker",
        "decode": "decode-worker",
    }
    spans = _assert_logs_join_the_trace(rec, procs, instances, expected_names)
    # The frontend's prefill stage is the parent of the prefill worker's span.
    prefill_stage = [s for s in spans if s.service == "tokenyard-frontend" and "prefill" in s.name]
    assert prefill_stage, [(s.service, s.name) for s in spans]
