"""Hostile clients against a real frontend (in this process), a router process and a mocker
worker: malformed bodies get a 4xx, limits hold, and nothing a client does leaves requests,
tasks or KV blocks behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio

from tests.fixtures.frontend import FrontendStack, frontend_stack, router_process
from tests.fixtures.processes import ServiceProcess
from tests.fixtures.worker import MODEL, eventually
from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tokenyard.frontend.limits import MAX_STOP_STRINGS
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# Decode never sleeps: a stream produces responses faster than a client that stopped reading
# takes them.
FAST = MockerConfig(speedup_ratio=0, block_size=4, num_gpu_blocks=8192, max_model_len=65536)
PER_STREAM = 8


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServiceProcess]]:
    with router_process(tmp_path_factory.mktemp("frontend-hostile")) as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(router: tuple[str, ServiceProcess]) -> AsyncIterator[FrontendStack]:
    async with frontend_stack(router, FAST, max_streams_per_connection=PER_STREAM) as s:
        yield s


async def test_a_message_role_that_is_not_a_string_is_400(stack: FrontendStack) -> None:
    s = stack
    for role in (["user"], {"role": "user"}):
        body = {"model": MODEL, "input": [{"role": role, "content": "hi"}], "max_output_tokens": 2}
        status, doc = await s.post("/v1/responses", body)
        assert status == 400, doc
        assert "input.0.role" in doc["error"]["message"]
    status, doc = await s.post("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2})
    assert status == 200 and doc["status"] == "incomplete"


async def test_too_many_stop_strings_are_400_on_every_surface(stack: FrontendStack) -> None:
    s = stack
    stop = ["never in the output"] * (MAX_STOP_STRINGS + 1)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, body in (
        ("/v1/chat/completions", {**chat, "stop": stop}),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stop": stop}),
        ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2, "stop": stop}),
    ):
        status, doc = await s.post(path, body)
        assert status == 400, (path, doc)
        assert f"at most {MAX_STOP_STRINGS} stop strings" in doc["error"]["message"]
    status, doc = await s.post("/v1/chat/completions", {**chat, "stop": stop[:MAX_STOP_STRINGS]})
    assert status == 200, doc
    await s.idle()


def _stream_request(rid: str, max_tokens: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL, id=rid)
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")
    req.inputs.add(name="streaming", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(max_tokens)
    return req


def _stream_tasks() -> list[str]:
    names = (getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks())
    return [n for n in names if n.startswith("KServeServicer.")]


async def test_a_stream_client_that_stops_reading_then_leaves_leaves_nothing_behind(
    stack: FrontendStack,
) -> None:
    s = stack
    # A small HTTP/2 window: the server's writes block soon after the client stops reading.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 0)]
    left = asyncio.Event()

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for i in range(PER_STREAM):
            yield _stream_request(str(i), 20000)
        await left.wait()

    async with grpc.aio.insecure_channel(s.frontend.address, options=options) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
        assert isinstance(await call.read(), pb.ModelStreamInferResponse)

        async def stalled() -> bool:
            # Every request is in flight and the stream's queue is full: nothing is read.
            return s.frontend.frontend.admission.active == PER_STREAM and len(_stream_tasks()) > PER_STREAM

        await eventually(stalled, "the stream's requests are all in flight")
        await asyncio.sleep(1.0)  # lets the responses pile up behind the unread stream
        call.cancel()
        left.set()

        async def gone() -> bool:
            return not _stream_tasks()

        await eventually(gone, "the stream's tasks ended after the client left")
    await s.idle()
