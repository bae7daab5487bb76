"""The frontend's limits and deadlines, each refused with a clear error that names its setting,
while other requests keep flowing: a router process, a real-time mocker worker (requests stay
in flight) and a frontend in this process with small limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio

from tests.fixtures.frontend import FrontendStack, frontend_stack, router_process
from tests.fixtures.http import counter_total
from tests.fixtures.processes import ServiceProcess
from tests.fixtures.worker import MODEL
from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tokenyard.frontend.openai_api import parse_chat
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# Real time: a long request stays in flight for seconds.
REAL_TIME = MockerConfig(speedup_ratio=1, block_size=4, num_gpu_blocks=8192, max_model_len=8192)
MAX_PROMPT = 64
MAX_OUTPUT = 4000
MAX_INFLIGHT = 3
PER_STREAM = 2
TIMEOUT = 1.5


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServiceProcess]]:
    with router_process(tmp_path_factory.mktemp("frontend-limits")) as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(router: tuple[str, ServiceProcess]) -> AsyncIterator[FrontendStack]:
    async with frontend_stack(
        router,
        REAL_TIME,
        max_prompt_tokens=MAX_PROMPT,
        max_output_tokens=MAX_OUTPUT,
        max_inflight_requests=MAX_INFLIGHT,
        max_streams_per_connection=PER_STREAM,
        request_timeout=TIMEOUT,
        max_body_bytes=64 * 1024,
        overload_status=503,
    ) as s:
        yield s


async def test_output_tokens_over_the_limit_are_refused_and_a_missing_limit_takes_it(
    stack: FrontendStack,
) -> None:
    s = stack
    status, out = await s.post(
        "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_OUTPUT + 1}
    )
    assert status == 400
    assert "max_tokens" in out["error"]["message"] and "--max-output-tokens" in out["error"]["message"]
    # Chat names no limit: the request runs with the server's (and would take it all).
    request, _ = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    generation = await s.frontend.frontend.start(request)
    assert generation.request.stop.max_tokens == MAX_OUTPUT
    await generation.aclose()
    await s.idle()


async def test_a_prompt_over_the_limit_is_refused(stack: FrontendStack) -> None:
    s = stack
    status, out = await s.post("/v1/completions", {"model": MODEL, "prompt": "word " * 200, "max_tokens": 1})
    assert status == 400
    assert "--max-prompt-tokens" in out["error"]["message"]
    status, out = await s.post("/v1/completions", {"model": MODEL, "prompt": "word " * 20, "max_tokens": 1})
    assert status == 200, out


async def test_a_body_over_the_limit_is_413_naming_the_setting(stack: FrontendStack) -> None:
    status, out = await stack.post("/v1/completions", {"model": MODEL, "prompt": "x" * 70_000})
    assert status == 413
    assert "--max-body-bytes" in out["error"]["message"]


async def test_requests_over_the_inflight_limit_get_the_overload_status(stack: FrontendStack) -> None:
    s = stack
    long_body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    before = await counter_total(s.http, s.base + "/metrics", "tokenyard_frontend_model_rejection")
    holders = [await s.http.post(s.base + "/v1/completions", json=long_body) for _ in range(MAX_INFLIGHT)]
    try:
        assert all(r.status == 200 for r in holders)
        status, out = await s.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        # Configured as 503 here (529 by default).
        assert status == 503, out
        assert (
            out["error"]["type"] == "overloaded_error"
            and "--max-inflight-requests" in out["error"]["message"]
        )
    finally:
        for r in holders:
            r.close()
    await s.idle()
    after = await counter_total(s.http, s.base + "/metrics", "tokenyard_frontend_model_rejection")
    assert after - before == 1
    status, out = await s.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 200, out


async def test_a_request_past_its_timeout_is_504_and_the_worker_stops(stack: FrontendStack) -> None:
    s = stack
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "ignore_eos": True}
    status, out = await s.post("/v1/completions", body)
    assert status == 504, out
    assert out["error"]["type"] == "timeout_error" and "--request-timeout" in out["error"]["message"]
    # Streaming: the status line is gone by then, so the timeout arrives as an error event.
    events: list[bytes] = []
    async with s.http.post(s.base + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status == 200
        async for line in r.content:
            if line.strip():
                events.append(line.strip())
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2][len(b"data: ") :])
    assert error["error"]["code"] == 504
    await s.idle()
    text = await (await s.http.get(s.base + "/metrics")).text()
    assert 'error_type="response_timeout"' in text


async def test_kserve_stream_refuses_requests_over_its_limit_in_band(stack: FrontendStack) -> None:
    s = stack

    def request(rid: str, max_tokens: int) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=MODEL, id=rid)
        for name, datatype, value in (
            ("text_input", "BYTES", [b"hello"]),
            ("streaming", "BOOL", [True]),
            ("max_tokens", "INT32", [max_tokens]),
        ):
            tensor = req.inputs.add(name=name, datatype=datatype, shape=[1])
            if datatype == "BYTES":
                tensor.contents.bytes_contents.extend(value)  # type: ignore[arg-type]
            elif datatype == "BOOL":
                tensor.contents.bool_contents.extend(value)  # type: ignore[arg-type]
            else:
                tensor.contents.int_contents.extend(value)  # type: ignore[arg-type]
        return req

    queue: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        while (item := await queue.get()) is not None:
            yield item

    async with grpc.aio.insecure_channel(s.frontend.address) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
        for rid in ("a", "b"):
            await queue.put(request(rid, 20))
        # Both are in flight (each has answered) before the third arrives.
        seen: set[str] = set()
        while seen != {"a", "b"}:
            first = await call.read()
            assert isinstance(first, pb.ModelStreamInferResponse)
            seen.add(first.infer_response.id)
        await queue.put(request("c", 20))
        errors: dict[str, str] = {}
        finals: set[str] = set()
        while finals != {"a", "b", "c"}:
            response = await call.read()
            assert isinstance(response, pb.ModelStreamInferResponse)
            rid = response.infer_response.id
            if response.error_message:
                errors[rid] = response.error_message
            if response.infer_response.parameters["triton_final_response"].bool_param:
                finals.add(rid)
        await queue.put(None)
        assert list(errors) == ["c"]
        assert "RESOURCE_EXHAUSTED" in errors["c"] and "--max-streams-per-connection" in errors["c"]
        await s.idle()
