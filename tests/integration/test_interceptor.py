"""The service interceptor maps errors to statuses, logs unknown errors once, counts RPCs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tokenyard.common.errors import InvalidArgument, NotFound, Overloaded, from_rpc_error
from tokenyard.common.interceptors import ServiceInterceptor
from tokenyard.common.logs import request_id_var
from tokenyard.common.metrics import Metrics

pytestmark = pytest.mark.integration

SERVICE = "demo.v1.Demo"


def _ident(b: bytes) -> bytes:
    return b


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    kind = request.decode()
    if kind == "invalid":
        raise InvalidArgument("prompt is empty")
    if kind == "missing":
        raise NotFound("no model named x")
    if kind == "busy":
        raise Overloaded("all workers busy")
    if kind == "boom":
        raise RuntimeError("secret internal detail")
    return request_id_var.get().encode()


async def _stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    for i in range(3):
        yield str(i).encode()
        if request == b"boom" and i == 1:
            raise RuntimeError("mid-stream failure")


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Metrics]]:
    metrics = Metrics("demo")
    srv = grpc.aio.server(interceptors=[ServiceInterceptor("demo", metrics)])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, _ident, _ident),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream, _ident, _ident),
    }
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield f"127.0.0.1:{port}", metrics
    await srv.stop(None)


async def _call(address: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    async with grpc.aio.insecure_channel(address) as channel:
        method = channel.unary_unary(f"/{SERVICE}/Unary", _ident, _ident)
        return bytes(await method(payload, metadata=metadata, timeout=5))


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (b"missing", grpc.StatusCode.NOT_FOUND, "no model named x"),
        (b"busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "all workers busy"),
    ],
)
async def test_domain_errors_keep_their_code_and_message(
    server: tuple[str, Metrics], payload: bytes, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await _call(server[0], payload)
    assert exc.value.code() == code
    assert exc.value.details() == message
    assert type(from_rpc_error(exc.value)).__name__ in {"InvalidArgument", "NotFound", "Overloaded"}


async def test_unknown_error_is_internal_generic_and_logged_once(
    server: tuple[str, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await _call(server[0], b"boom", (("x-request-id", "req-42"),))
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (exc.value.details() or "")
    assert "req-42" in (exc.value.details() or "")
    tracebacks = [r for r in caplog.records if r.exc_info and "secret internal detail" in str(r.exc_info[1])]
    assert len(tracebacks) == 1


async def test_request_id_is_propagated_or_generated(server: tuple[str, Metrics]) -> None:
    assert await _call(server[0], b"ok", (("x-request-id", "abc-123"),)) == b"abc-123"
    generated = await _call(server[0], b"ok")
    assert generated and generated != b"-"


async def test_stream_error_after_messages(server: tuple[str, Metrics]) -> None:
    async with grpc.aio.insecure_channel(server[0]) as channel:
        call = channel.unary_stream(f"/{SERVICE}/Stream", _ident, _ident)(b"boom", timeout=5)
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for item in call:
                got.append(item)
        assert got == [b"0", b"1"]
        assert exc.value.code() == grpc.StatusCode.INTERNAL


async def test_metrics_count_by_code(server: tuple[str, Metrics]) -> None:
    address, metrics = server
    await _call(address, b"ok")
    with pytest.raises(grpc.aio.AioRpcError):
        await _call(address, b"invalid")
    text = metrics.render()[0].decode()
    assert f'tokenyard_rpc_requests_total{{code="OK",method="/{SERVICE}/Unary",service="demo"}} 1.0' in text
    assert (
        f'tokenyard_rpc_requests_total{{code="INVALID_ARGUMENT",method="/{SERVICE}/Unary",service="demo"}} 1.0'
        in text
    )
    assert 'tokenyard_rpc_in_flight{service="demo"} 0.0' in text


def test_two_metrics_objects_do_not_collide() -> None:
    Metrics("a")
    Metrics("a")
