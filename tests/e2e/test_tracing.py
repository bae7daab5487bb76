"""Tracing: off by default at no cost; with OTEL_EXPORTER_OTLP_ENDPOINT set, a real service exports
one span per RPC to an OTLP receiver, continuing the caller's W3C trace context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.fixtures.http import frontend_serves
from tests.fixtures.processes import ServiceProcessFactory, wait_for_instance
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.common import tracing

pytestmark = pytest.mark.e2e

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.arrived = asyncio.Event()

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)
        self.arrived.set()
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


def test_tracing_is_off_without_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert tracing.setup_tracing("router") is False
    assert tracing.tracer() is None
    assert tracing.inject_headers() == {}


async def test_rpc_span_exported_with_caller_context(
    receiver: tuple[Receiver, int], spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    rec, port = receiver
    url = f"dir://{tmp_path}"
    proc = spawn(
        ["router", "--port", "0", "--metrics-port", "0", "--discovery", url],
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        },
    )
    instance = await wait_for_instance(url, "router", proc=proc)
    async with grpc.aio.insecure_channel(instance.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        reply = await stub.NotifyFirstToken(
            router_pb2.NotifyFirstTokenRequest(request_id="nope"),
            metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),),
            timeout=5,
        )
    assert reply.applied is False
    # The exporter flushes at shutdown; keep this loop free to receive it.
    assert await asyncio.to_thread(proc.terminate) == 0
    await asyncio.wait_for(rec.arrived.wait(), 10)
    spans = [s for s in rec.spans if s.name.endswith("/NotifyFirstToken")]
    assert len(spans) == 1, [s.name for s in rec.spans]
    assert spans[0].trace_id.hex() == TRACE_ID
    assert spans[0].parent_span_id.hex() == PARENT_ID


async def test_one_trace_per_request_spans_frontend_router_and_worker(
    receiver: tuple[Receiver, int], spawn: ServiceProcessFactory, tmp_path: Path
) -> None:
    rec, port = receiver
    url = f"dir://{tmp_path}"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    base = ["--port", "0", "--metrics-port", "0", "--discovery", url]
    router = spawn(["router", *base], env=env)
    worker = spawn(["worker", *base, "--engine", "mocker", "--mocker-speedup-ratio", "0"], env=env)
    frontend = spawn(["frontend", "--port", "0", "--http-port", "0", "--discovery", url], env=env)
    await wait_for_instance(url, "router", proc=router)
    await wait_for_instance(url, "worker", proc=worker)
    front = await wait_for_instance(url, "frontend", proc=frontend)
    http = f"http://{front.metrics_address}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if await frontend_serves(session, http, "SmolLM2-135M-Instruct"):
                break
            await asyncio.sleep(0.1)
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "trace me", "max_tokens": 3}
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        async with session.post(f"{http}/v1/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
    # Spans are flushed at shutdown.
    for proc in (frontend, worker, router):
        assert await asyncio.to_thread(proc.terminate) == 0
    traced = [s for s in rec.spans if s.trace_id.hex() == TRACE_ID]
    by_name = {s.name: s for s in traced}
    root = by_name["frontend.request"]
    assert root.parent_span_id.hex() == PARENT_ID
    for stage in ("tokenize", "route", "generate"):
        assert by_name[stage].parent_span_id == root.span_id, stage
    # The router's Route and the worker's Generate continue the frontend's stages.
    route_rpc = next(s for s in traced if s.name.endswith("/Route"))
    generate_rpc = next(s for s in traced if s.name.endswith("/Generate"))
    assert route_rpc.parent_span_id == by_name["route"].span_id
    assert generate_rpc.parent_span_id == by_name["generate"].span_id
