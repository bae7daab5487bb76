"""The frontend's two surfaces against an in-process deployment: a real router, a real mocker
worker and the frontend, each a gRPC server on a loopback ephemeral port, meeting in in-memory
discovery.

The mocker's tokens are a pure function of the request's seed and sequence position
(tokenyard.worker.mocker.request), so a test that fixes the seed knows the exact text to expect.
The in-process router also lets each test check that every request's end reached the router
exactly once (its active set drains back to empty).
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from tests.fixtures.worker import MODEL, RunningWorker, eventually, running_worker
from tokenyard.common.service import ServiceRuntime
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer
from tokenyard.frontend.tokenizer import Tokenizer, load_tokenizer
from tokenyard.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tokenyard.kserve.v2 import model_config_pb2 as mc
from tokenyard.router.active import ActiveRequests
from tokenyard.router.config import RouterSettings
from tokenyard.router.servicer import SERVICE_NAME as ROUTER_SERVICE
from tokenyard.router.servicer import RouterServicer
from tokenyard.router.v1 import router_pb2_grpc
from tokenyard.router.workers import WorkerSet, WorkerWatch
from tokenyard.worker.mocker.config import MockerConfig
from tokenyard.worker.mocker.request import pseudo_token

pytestmark = pytest.mark.integration

# Speedup 0: steps never sleep. Blocks of 4 tokens, so short prompts fill blocks.
FAST = MockerConfig(speedup_ratio=0, block_size=4, num_gpu_blocks=4096, max_model_len=4096)
# Real time (milliseconds per step): long requests stay in flight while a test cancels them.
REAL_TIME = MockerConfig(speedup_ratio=1, block_size=4, num_gpu_blocks=8192, max_model_len=8192)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer("smollm2")


def expected_text(tok: Tokenizer, seed: int, prompt_tokens: int, n: int) -> str:
    ids = [pseudo_token(seed, prompt_tokens + k, FAST.vocab_size) for k in range(n)]
    return tok.decode(ids)


@dataclass
class Stack:
    worker: RunningWorker
    frontend: FrontendServer
    active: ActiveRequests
    http: aiohttp.ClientSession
    channel: grpc.aio.Channel

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.frontend.http_port}"

    @property
    def kserve(self) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.post(self.base + path, data=data) as r:
            return r.status, await r.json(content_type=None)

    async def sse(self, path: str, body: dict[str, Any]) -> list[Any]:
        events: list[Any] = []
        async with self.http.post(self.base + path, json=body) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.strip():
                    assert line.startswith(b"data: "), line
                    payload = line[6:].strip()
                    events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
        return events

    async def drained(self) -> None:
        """Every routed request's end reached the router, and the worker holds no blocks."""
        await eventually(lambda: _true(len(self.active) == 0), "the router forgot every request")
        await eventually(lambda: _zero(self.worker.active_blocks()), "the worker freed every block")


async def _true(value: bool) -> bool:
    return value


async def _zero(value: Any) -> bool:
    return await value == 0


@asynccontextmanager
async def running_router(discovery: str) -> AsyncIterator[tuple[ServiceRuntime, ActiveRequests]]:
    """The router's own parts, wired as its server does, in this process."""
    settings = RouterSettings(host="127.0.0.1", port=0, metrics_port=0, discovery=discovery, grace_period=0.5)
    async with ServiceRuntime(settings, service="router", metrics_port=0) as runtime:
        workers, active = WorkerSet(), ActiveRequests()
        servicer = RouterServicer(workers, active, "round-robin")
        runtime.add_servicer(router_pb2_grpc.add_RouterServiceServicer_to_server, servicer, ROUTER_SERVICE)
        await runtime.start()
        watch = WorkerWatch(runtime.discovery, workers)
        watch.start()
        runtime.set_serving(True)
        try:
            yield runtime, active
        finally:
            await watch.close()


@asynccontextmanager
async def running_stack(mocker: MockerConfig = FAST) -> AsyncIterator[Stack]:
    discovery = f"memory://frontend-test-{uuid.uuid4().hex}"
    settings = FrontendSettings(host="127.0.0.1", port=0, http_port=0, discovery=discovery, grace_period=1.0)
    async with (
        running_router(discovery) as (_, active),
        running_worker(mocker, discovery=discovery) as worker,
        FrontendServer(settings) as frontend,
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(frontend.address) as channel,
    ):
        await eventually(lambda: _true(frontend.models.get(MODEL) is not None), "the frontend saw the worker")
        await eventually(lambda: _true(frontend.router.address != ""), "the frontend found the router")
        stack = Stack(worker, frontend, active, http, channel)
        # The router's worker watch runs on its own schedule: wait until it routes.
        await eventually(lambda: _routes(stack), "the router saw the worker")
        yield stack


async def _routes(stack: Stack) -> bool:
    status, _ = await stack.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
    return status == 200


# ---- OpenAI HTTP ----------------------------------------------------------------------------


async def test_completion_text_is_the_detokenized_worker_output(tokenizer: Tokenizer) -> None:
    async with running_stack() as s:
        status, body = await s.post(
            "/v1/completions", {"model": MODEL, "prompt": "The sky is", "max_tokens": 12, "seed": 5}
        )
        assert status == 200, body
        usage = body["usage"]
        prompt_tokens = len(tokenizer.encode("The sky is", add_special_tokens=True))
        assert usage["prompt_tokens"] == prompt_tokens
        assert usage["completion_tokens"] == 12
        assert usage["total_tokens"] == prompt_tokens + 12
        assert body["object"] == "text_completion"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["choices"][0]["text"] == expected_text(tokenizer, 5, prompt_tokens, 12)
        await s.drained()


async def test_streaming_and_unary_chat_agree_and_report_usage(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    body = {"model": MODEL, "messages": messages, "max_completion_tokens": 20, "seed": 11}
    async with running_stack() as s:
        status, unary = await s.post("/v1/chat/completions", body)
        assert status == 200, unary
        events = await s.sse(
            "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        await s.drained()
    prompt = tokenizer.apply_chat_template(messages)
    prompt_tokens = len(tokenizer.encode(prompt))
    text = expected_text(tokenizer, 11, prompt_tokens, 20)
    assert unary["object"] == "chat.completion"
    assert unary["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert unary["usage"]["completion_tokens"] == 20
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk, _ = events
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert all(c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 20
    assert usage_chunk["usage"]["prompt_tokens"] == prompt_tokens


async def test_streaming_without_include_usage_sends_no_usage() -> None:
    async with running_stack() as s:
        events = await s.sse(
            "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 5, "stream": True}
        )
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_a_repeated_prompt_reports_cached_tokens() -> None:
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    async with running_stack() as s:
        _, first = await s.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
        _, second = await s.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["usage"]["prompt_tokens"]


async def test_a_stop_string_cuts_the_output_and_frees_the_request(tokenizer: Tokenizer) -> None:
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 40, "seed": 3}
    async with running_stack() as s:
        _, full = await s.post("/v1/completions", body)
        text = full["choices"][0]["text"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        _, cut = await s.post("/v1/completions", {**body, "stop": [stop]})
        events = await s.sse("/v1/completions", {**body, "stop": stop, "stream": True})
        await s.drained()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == text[: text.index(stop)]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_echo_prepends_the_prompt() -> None:
    async with running_stack() as s:
        _, plain = await s.post(
            "/v1/completions", {"model": MODEL, "prompt": "Echo me", "max_tokens": 4, "seed": 1}
        )
        _, echoed = await s.post(
            "/v1/completions", {"model": MODEL, "prompt": "Echo me", "max_tokens": 4, "seed": 1, "echo": True}
        )
    assert echoed["choices"][0]["text"] == "Echo me" + plain["choices"][0]["text"]


async def test_token_id_prompts_and_stop_token_ids_reach_the_worker() -> None:
    prompt = list(range(100, 120))
    seed = 9
    expected = [pseudo_token(seed, len(prompt) + k, FAST.vocab_size) for k in range(30)]
    index = next(i for i in range(3, 30) if expected[i] not in expected[:i])
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 30,
        "seed": seed,
        "stop_token_ids": [expected[index]],
    }
    async with running_stack() as s:
        status, out = await s.post("/v1/completions", body)
    assert status == 200, out
    assert out["usage"]["prompt_tokens"] == 20
    assert out["usage"]["completion_tokens"] == index + 1
    assert out["choices"][0]["finish_reason"] == "stop"


async def test_unknown_fields_are_ignored() -> None:
    async with running_stack() as s:
        status, out = await s.post(
            "/v1/completions",
            {
                "model": MODEL,
                "prompt": "x",
                "max_tokens": 2,
                "rid": "abc",
                "return_text_in_logprobs": True,
                "nvext": {},
            },
        )
    assert status == 200, out


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/completions", b"{not json", "not valid JSON"),
        ("/v1/completions", b"", "empty"),
        ("/v1/completions", [1, 2], "JSON object"),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 9}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, "one prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 99999999]}, "token ids"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**6}, "context length"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, "role"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "text parts",
        ),
    ],
)
async def test_malformed_requests_get_400_with_an_openai_error(path: str, body: Any, fragment: str) -> None:
    async with running_stack() as s:
        status, out = await s.post(path, body)
        # The server took no harm: the next request is served.
        ok, _ = await s.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        await s.drained()
    assert status == 400, out
    assert out["error"]["code"] == 400 and out["error"]["type"] == "invalid_request_error"
    assert fragment in out["error"]["message"]
    assert ok == 200


async def test_unknown_model_is_404_and_unknown_path_is_404() -> None:
    async with running_stack() as s:
        status, out = await s.post("/v1/completions", {"model": "no-such-model", "prompt": "x"})
        async with s.http.get(s.base + "/v2/nothing") as r:
            path_status = r.status
    assert status == 404 and "no-such-model" in out["error"]["message"]
    assert path_status == 404


async def test_oversized_body_is_413() -> None:
    async with running_stack() as s:
        status, out = await s.post("/v1/completions", b"{" + b" " * (33 * 1024 * 1024) + b"}")
    assert status == 413
    assert out["error"]["code"] == 413


async def test_a_client_that_disconnects_mid_stream_frees_the_worker_blocks() -> None:
    body = {"model": MODEL, "prompt": "x " * 40, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    async with running_stack(REAL_TIME) as s:
        response = await s.http.post(s.base + "/v1/completions", json=body)
        assert response.status == 200
        await response.content.readline()
        assert await s.worker.active_blocks() > 0
        assert len(s.active) == 1
        response.close()
        await s.drained()


async def test_health_models_and_metrics() -> None:
    async with running_stack() as s:
        async with s.http.get(s.base + "/health") as r:
            health = await r.json()
        async with s.http.get(s.base + "/v1/models") as r:
            models = await r.json()
        async with s.http.get(s.base + "/metrics") as r:
            metrics = await r.text()
    assert health["status"] == "healthy" and health["models"] == [MODEL]
    assert [m["id"] for m in models["data"]] == [MODEL]
    # The readiness probe of the fixture made one successful unary completion.
    assert (
        f'tokenyard_frontend_requests_total{{endpoint="completions",error_type="",model="{MODEL}",'
        f'request_type="unary",status="success"}} ' in metrics
    )
    for name in (
        "tokenyard_frontend_time_to_first_token_seconds_bucket",
        "tokenyard_frontend_request_duration_seconds_bucket",
        "tokenyard_frontend_input_sequence_tokens_bucket",
        "tokenyard_frontend_output_sequence_tokens_bucket",
        "tokenyard_rpc_requests_total",
    ):
        assert name in metrics


# ---- KServe v2 gRPC ---------------------------------------------------------------------------


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _raw_request(
    prompt: bytes, *extra: tuple[str, str, bytes], shape: tuple[int, ...] = (1,)
) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor
    inputs = [tensor(name="text_input", datatype="BYTES", shape=shape)]
    raw = [_bytes_element(prompt)]
    for name, dtype, data in extra:
        inputs.append(tensor(name=name, datatype=dtype, shape=[1]))
        raw.append(data)
    return pb.ModelInferRequest(model_name=MODEL, id="req-1", inputs=inputs, raw_input_contents=raw)


def _seed(request: pb.ModelInferRequest, seed: int) -> pb.ModelInferRequest:
    request.parameters["seed"].int64_param = seed
    return request


def _outputs(response: pb.ModelInferResponse) -> dict[str, str]:
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        (length,) = struct.unpack_from("<I", raw)
        assert len(raw) == 4 + length
        out[tensor.name] = raw[4:].decode()
    return out


def _max_tokens(n: int) -> tuple[str, str, bytes]:
    return ("max_tokens", "INT32", struct.pack("<i", n))


async def test_kserve_infer_raw_and_typed_contents_agree(tokenizer: Tokenizer) -> None:
    typed = pb.ModelInferRequest(
        model_name=MODEL,
        id="typed",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="text_input",
                datatype="BYTES",
                shape=[1, 1],
                contents=pb.InferTensorContents(bytes_contents=[b"Hello world"]),
            ),
            pb.ModelInferRequest.InferInputTensor(
                name="max_tokens",
                datatype="INT64",
                shape=[1],
                contents=pb.InferTensorContents(int64_contents=[7]),
            ),
        ],
    )
    async with running_stack() as s:
        raw = await s.kserve.ModelInfer(_seed(_raw_request(b"Hello world", _max_tokens(7)), 21))
        again = await s.kserve.ModelInfer(_seed(typed, 21))
        await s.drained()
    prompt_tokens = len(tokenizer.encode("Hello world", add_special_tokens=True))
    assert _outputs(raw) == {
        "text_output": expected_text(tokenizer, 21, prompt_tokens, 7),
        "finish_reason": "length",
    }
    assert _outputs(again) == _outputs(raw)
    assert (raw.id, again.id, raw.model_name, raw.model_version) == ("req-1", "typed", MODEL, "1")
    assert [t.shape for t in raw.outputs] == [[1], [1]]


async def test_kserve_generation_options_arrive_as_inputs_parameters_or_json(tokenizer: Tokenizer) -> None:
    sampling = json.dumps({"max_tokens": 3, "seed": 4}).encode()
    async with running_stack() as s:
        as_json = await s.kserve.ModelInfer(
            _raw_request(b"Hi", ("sampling_parameters", "BYTES", _bytes_element(sampling)))
        )
        as_params = _raw_request(b"Hi")
        as_params.parameters["max_tokens"].int64_param = 3
        as_params.parameters["seed"].uint64_param = 4
        # Parameters clients add that mean nothing here, one with no value at all.
        as_params.parameters["sequence_id"].uint64_param = 12
        as_params.parameters["triton_enable_empty_final_response"].bool_param = True
        as_params.parameters["custom"].double_param = 0.5
        as_params.parameters["nothing"].CopyFrom(pb.InferParameter())
        by_params = await s.kserve.ModelInfer(as_params)
        with_input = await s.kserve.ModelInfer(
            _seed(_raw_request(b"Hi", ("exclude_input_in_output", "BOOL", b"\x00"), _max_tokens(3)), 4)
        )
    prompt_tokens = len(tokenizer.encode("Hi", add_special_tokens=True))
    text = expected_text(tokenizer, 4, prompt_tokens, 3)
    assert _outputs(as_json)["text_output"] == text
    assert _outputs(by_params)["text_output"] == text
    assert _outputs(with_input)["text_output"] == "Hi" + text


async def test_kserve_default_max_tokens_is_16() -> None:
    async with running_stack() as s:
        before = _counter(s, "tokenyard_frontend_output_tokens_total")
        await s.kserve.ModelInfer(_raw_request(b"Hi"))
        assert _counter(s, "tokenyard_frontend_output_tokens_total") - before == 16


def _counter(s: Stack, name: str) -> float:
    text = s.frontend.runtime.metrics.render()[0].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (
            _raw_request(b"x", ("streaming", "BOOL", b"\x01")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ModelStreamInfer",
        ),
        (
            _raw_request(b"x", ("stream", "BOOL", b"\x01")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ModelStreamInfer",
        ),
        (
            _raw_request(b"x", ("bogus", "BYTES", _bytes_element(b"y"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bogus",
        ),
        (_raw_request(b"x", ("streaming", "INT32", b"\x01\0\0\0")), grpc.StatusCode.INVALID_ARGUMENT, "BOOL"),
        (_raw_request(b"x", ("max_tokens", "FP32", b"\0\0\0\0")), grpc.StatusCode.INVALID_ARGUMENT, "INT32"),
        (_raw_request(b"x", _max_tokens(0)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            _raw_request(b"x", ("sampling_parameters", "BYTES", _bytes_element(b"{bad"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "JSON",
        ),
        (
            pb.ModelInferRequest(
                model_name=MODEL,
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
                ],
                raw_input_contents=[b"\x09\0\0\0abc"],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "overruns",
        ),
        (
            pb.ModelInferRequest(
                model_name=MODEL,
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1]),
                    pb.ModelInferRequest.InferInputTensor(name="max_tokens", datatype="INT32", shape=[1]),
                ],
                raw_input_contents=[_bytes_element(b"x")],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "raw_input_contents",
        ),
        (
            pb.ModelInferRequest(
                model_name=MODEL,
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[0])
                ],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no elements",
        ),
        (pb.ModelInferRequest(model_name=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "text_input is required"),
        (
            pb.ModelInferRequest(
                model_name="no-such-model",
                inputs=_raw_request(b"x").inputs,
                raw_input_contents=[_bytes_element(b"x")],
            ),
            grpc.StatusCode.NOT_FOUND,
            "no-such-model",
        ),
    ],
)
async def test_kserve_bad_requests_get_a_status(
    request_: pb.ModelInferRequest, code: grpc.StatusCode, fragment: str
) -> None:
    async with running_stack() as s:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.kserve.ModelInfer(request_)
        await s.drained()
    assert info.value.code() == code
    assert fragment in (info.value.details() or "")


async def test_kserve_stream_serves_requests_concurrently_and_reports_errors_in_band(
    tokenizer: Tokenizer,
) -> None:
    streaming = ("streaming", "BOOL", b"\x01")
    long_, bad, short, unary = (
        _raw_request(b"long", streaming, _max_tokens(3000)),
        _raw_request(b"bad", ("bogus", "BOOL", b"\x01")),
        _raw_request(b"short", streaming, _max_tokens(3)),
        _raw_request(b"unary", _max_tokens(5)),
    )
    for request, rid in ((long_, "long"), (bad, "bad"), (short, "short"), (unary, "unary")):
        request.id = rid
    async with running_stack(REAL_TIME) as s:
        call = s.kserve.ModelStreamInfer(iter([long_, bad, short, unary]))
        finals: list[str] = []
        errors: dict[str, str] = {}
        texts: dict[str, list[str]] = {}
        async for response in call:
            rid = response.infer_response.id
            assert rid not in finals, f"a response for {rid} after its final one"
            if response.error_message:
                errors[rid] = response.error_message
            else:
                texts.setdefault(rid, []).append(_outputs(response.infer_response)["text_output"])
            if response.infer_response.parameters["triton_final_response"].bool_param:
                finals.append(rid)
        await s.drained()
    # The short requests did not wait for the long one that was sent first.
    assert finals.index("short") < finals.index("long") and finals.index("unary") < finals.index("long")
    assert sorted(finals) == ["bad", "long", "short", "unary"]
    assert list(errors) == ["bad"] and "INVALID_ARGUMENT" in errors["bad"] and "bogus" in errors["bad"]
    assert len(texts["unary"]) == 1
    assert len(texts["long"]) > 1


async def test_kserve_stream_cancel_frees_the_worker_blocks() -> None:
    request = _raw_request(b"x " * 40, ("streaming", "BOOL", b"\x01"), _max_tokens(4000))
    async with running_stack(REAL_TIME) as s:
        call = s.kserve.ModelStreamInfer(iter([request]))
        first = await call.read()
        assert isinstance(first, pb.ModelStreamInferResponse) and not first.error_message
        assert await s.worker.active_blocks() > 0
        call.cancel()
        await s.drained()


async def test_kserve_metadata_and_config_agree() -> None:
    async with running_stack() as s:
        k = s.kserve
        live = await k.ServerLive(pb.ServerLiveRequest())
        ready = await k.ServerReady(pb.ServerReadyRequest())
        model_ready = await k.ModelReady(pb.ModelReadyRequest(name=MODEL))
        other_ready = await k.ModelReady(pb.ModelReadyRequest(name="nope"))
        server = await k.ServerMetadata(pb.ServerMetadataRequest())
        meta = await k.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
        config = (await k.ModelConfig(pb.ModelConfigRequest(name=MODEL))).config
        stats = await k.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL))
        index = await k.RepositoryIndex(pb.RepositoryIndexRequest())
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await k.ModelConfig(pb.ModelConfigRequest(name="nope"))
    assert live.live and ready.ready and model_ready.ready and not other_ready.ready
    assert server.name == "tokenyard"
    assert meta.name == MODEL and list(meta.versions) == ["1"]
    assert config.max_batch_size == 0 and config.model_transaction_policy.decoupled
    dtype = {mc.TYPE_STRING: "BYTES", mc.TYPE_BOOL: "BOOL", mc.TYPE_INT32: "INT32"}
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
        (i.name, dtype[i.data_type], list(i.dims)) for i in config.input
    ]
    assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [
        (o.name, dtype[o.data_type], list(o.dims)) for o in config.output
    ]
    assert {i.name for i in config.input if not i.optional} == {"text_input"}
    assert {i.name for i in config.input} == {
        "text_input",
        "streaming",
        "stream",
        "max_tokens",
        "exclude_input_in_output",
        "sampling_parameters",
    }
    assert [o.name for o in config.output] == ["text_output", "finish_reason"]
    assert [m.name for m in stats.model_stats] == [MODEL]
    assert [(m.name, m.state) for m in index.models] == [(MODEL, "READY")]
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_model_whose_workers_left_is_unavailable_not_unknown() -> None:
    async with running_stack() as s:
        await s.worker.server.runtime.discovery.deregister(s.worker.server.runtime.instance_id)
        await eventually(
            lambda: _true(s.frontend.models.get(MODEL) is None), "the frontend saw the worker leave"
        )
        status, out = await s.post("/v1/completions", {"model": MODEL, "prompt": "x"})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.kserve.ModelInfer(_raw_request(b"x"))
        async with s.http.get(s.base + "/v1/models") as r:
            listed = await r.json()
    assert status == 503 and out["error"]["code"] == 503
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert listed["data"] == []
