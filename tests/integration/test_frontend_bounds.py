"""Hostile clients against a real frontend (in this process), a router process and a mocker worker:
loose values are refused, the KServe message limit holds, and the HTTP server bounds its
connections (a connection limit with a clear 503, header, body and idle timeouts)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from tests.fixtures.frontend import FrontendStack, frontend_stack, router_process
from tests.fixtures.processes import ServiceProcess
from tests.fixtures.worker import MODEL, eventually
from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

FAST = MockerConfig(speedup_ratio=0, block_size=4, num_gpu_blocks=4096, max_model_len=4096)
MAX_CONNECTIONS = 6
DEFAULT_MAX_TOKENS = 5
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServiceProcess]]:
    with router_process(tmp_path_factory.mktemp("frontend-bounds")) as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(router: tuple[str, ServiceProcess]) -> AsyncIterator[FrontendStack]:
    """Few connections: the connection limit and the value checks. Idle connections (the test
    client's pooled one) go soon; a connection that began a request head stays a minute."""
    async with frontend_stack(
        router,
        FAST,
        http_max_connections=MAX_CONNECTIONS,
        http_idle_timeout=1.0,
        http_header_timeout=60.0,
        default_max_tokens=DEFAULT_MAX_TOKENS,
    ) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def quick(router: tuple[str, ServiceProcess]) -> AsyncIterator[FrontendStack]:
    """Short timers: what a slow or silent client gets."""
    async with frontend_stack(
        router, FAST, http_header_timeout=0.5, http_body_timeout=0.5, http_idle_timeout=1.0
    ) as s:
        yield s


async def _post_raw(s: FrontendStack, path: str, body: bytes, content_type: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    async with s.http.post(s.base + path, data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


# ---- loose values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("stream", "yes"), ("stream", 1), ("max_tokens", True), ("ignore_eos", "true"), ("temperature", "0.5")],
)
async def test_a_value_of_the_wrong_json_type_is_400(stack: FrontendStack, field: str, value: object) -> None:
    status, doc = await stack.post("/v1/chat/completions", {**CHAT, field: value})
    assert status == 400, doc
    assert doc["error"]["message"].startswith(field), doc


async def test_responses_refuse_a_string_for_a_boolean(stack: FrontendStack) -> None:
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, "stream": "true"}
    status, doc = await stack.post("/v1/responses", body)
    assert status == 400 and "stream" in doc["error"]["message"], doc


async def test_an_unknown_chat_role_is_400(stack: FrontendStack) -> None:
    body = {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}
    status, doc = await stack.post("/v1/chat/completions", body)
    assert status == 400, doc
    assert "unknown role 'wizard'" in doc["error"]["message"]
    for role in ("system", "developer", "user"):
        status, doc = await stack.post(
            "/v1/chat/completions", {**CHAT, "messages": [{"role": role, "content": "x"}]}
        )
        assert status == 200, (role, doc)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
    ],
)
async def test_a_body_not_labelled_json_is_415(stack: FrontendStack, content_type: str) -> None:
    status, doc = await _post_raw(stack, "/v1/chat/completions", json.dumps(CHAT).encode(), content_type)
    assert status == 415, doc
    assert "JSON" in doc["error"]["message"] or "UTF-8" in doc["error"]["message"]


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8"])
async def test_a_json_body_is_served(stack: FrontendStack, content_type: str | None) -> None:
    status, doc = await _post_raw(stack, "/v1/chat/completions", json.dumps(CHAT).encode(), content_type)
    assert status == 200, doc


async def test_a_request_without_max_tokens_gets_the_default_cap(stack: FrontendStack) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    status, doc = await stack.post("/v1/chat/completions", body)
    assert status == 200, doc
    assert doc["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    assert doc["choices"][0]["finish_reason"] == "length"
    # A client may ask for more than the default: it is a default, not a ceiling.
    status, doc = await stack.post("/v1/chat/completions", {**body, "max_tokens": DEFAULT_MAX_TOKENS + 3})
    assert status == 200 and doc["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS + 3


# ---- KServe -------------------------------------------------------------------------------------


def _infer(text: bytes = b"hi", version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL, model_version=version)
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(text)
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(2)
    return req


async def test_kserve_refuses_a_model_version_that_does_not_exist(stack: FrontendStack) -> None:
    async with grpc.aio.insecure_channel(stack.frontend.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(_infer(version="2"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no version '2'" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version="7"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="2"), timeout=10)).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1"), timeout=10)).ready
        reply = await stub.ModelInfer(_infer(version="1"), timeout=10)
        assert reply.model_version == "1"


async def test_kserve_refuses_a_boolean_option_that_is_not_a_boolean(stack: FrontendStack) -> None:
    req = _infer()
    req.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        b'{"ignore_eos": "yes"}'
    )
    async with grpc.aio.insecure_channel(stack.frontend.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ignore_eos" in (err.value.details() or "")


async def test_kserve_refuses_a_message_over_its_documented_32_mib(stack: FrontendStack) -> None:
    big = _infer(b"x" * (33 * 1024 * 1024))
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(stack.frontend.address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(big, timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (err.value.details() or "")
        # The channel is fine afterwards: a normal request on it is served.
        assert (await stub.ModelInfer(_infer(), timeout=10)).outputs


# ---- connections --------------------------------------------------------------------------------


async def _open(s: FrontendStack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", s.frontend.http_port)


async def _read_all(reader: asyncio.StreamReader, timeout: float = 30.0) -> bytes:
    """Everything until the server closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout)


_GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


async def test_a_connection_over_the_limit_gets_503_and_close(stack: FrontendStack) -> None:
    s = stack
    listener = s.frontend.listener
    await eventually(lambda_async(lambda: listener.open_connections == 0), "no connection open")
    held = [await _open(s) for _ in range(MAX_CONNECTIONS)]
    for _, writer in held:
        writer.write(b"G")  # a request begun: held by the header timer, not the idle one
    try:
        await eventually(lambda_async(lambda: listener.open_connections == MAX_CONNECTIONS), "all held")
        reader, writer = await _open(s)
        writer.write(_GET_HEALTH)
        answer = await _read_all(reader)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"Connection: close" in head
        assert b"--http-max-connections" in body and json.loads(body)["error"]["code"] == 503
        assert listener.refused >= 1
    finally:
        for _, writer in held:
            writer.close()
    await eventually(lambda_async(lambda: listener.open_connections == 0), "the held ones closed")
    reader, writer = await _open(s)
    writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert (await _read_all(reader)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_slowloris_headers_get_408_and_close(quick: FrontendStack) -> None:
    listener = quick.frontend.listener
    before = listener.header_timeouts
    reader, writer = await _open(quick)
    writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n")
    received = bytearray()

    async def drip() -> None:
        # A header line every 100 ms: bytes keep coming, the head never ends.
        for i in range(600):
            writer.write(f"X-Drip-{i}: 1\r\n".encode())
            await asyncio.sleep(0.1)

    dripping = asyncio.create_task(drip())
    try:
        received += await _read_all(reader)
    finally:
        dripping.cancel()
        writer.close()
    assert received.startswith(b"HTTP/1.1 408"), bytes(received)
    assert b"--http-header-timeout" in received
    assert listener.header_timeouts == before + 1


async def test_a_silent_connection_is_closed(quick: FrontendStack) -> None:
    listener = quick.frontend.listener
    before = listener.idle_closed
    reader, writer = await _open(quick)
    assert await _read_all(reader) == b""
    writer.close()
    assert listener.idle_closed > before


async def test_an_idle_keepalive_connection_is_closed_after_its_request(quick: FrontendStack) -> None:
    reader, writer = await _open(quick)
    writer.write(_GET_HEALTH)
    answer = await _read_all(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")


async def test_a_slow_body_gets_408(quick: FrontendStack) -> None:
    reader, writer = await _open(quick)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"model": '
    )
    answer = await _read_all(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"--http-body-timeout" in answer


async def test_health_live_and_ready(stack: FrontendStack) -> None:
    for path in ("/health", "/health/live", "/health/ready"):
        async with stack.http.get(stack.base + path) as r:
            assert r.status == 200, (path, await r.text())
    async with stack.http.get(stack.base + "/health/ready") as r:
        doc = await r.json()
    # (Both stacks of this module register a worker in the same discovery.)
    assert doc["ready"] is True and doc["routers"] == 1 and doc["workers"] >= 1, doc


def lambda_async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run
