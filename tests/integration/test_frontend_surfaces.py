"""The frontend's two surfaces against a small deployment: a router process, mocker workers and
the frontend in this process, each a gRPC server on a loopback ephemeral port, meeting in a
discovery directory.

The mocker's tokens are a pure function of the request's seed and sequence position
(tokenyard.worker.engines.mocker.executor), so a test that fixes the seed knows the exact text to expect.
Every test also checks that the requests it made ended cleanly: the worker holds no KV blocks,
and the router had already been told of each request's first token and end (a late notification
of ours is then a no-op: ``applied = false``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio

from tests.fixtures.frontend import router_process
from tests.fixtures.processes import ServiceProcess, wait_for_instance
from tests.fixtures.worker import MODEL, RunningWorker, eventually, running_worker
from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tokenyard.api.kserve.v2 import model_config_pb2 as mc
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer
from tokenyard.frontend.tokenizer import Tokenizer, load_tokenizer
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.executor import pseudo_token

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# Speedup 0: steps never sleep. Blocks of 4 tokens, so short prompts fill blocks.
FAST = MockerConfig(speedup_ratio=0, block_size=4, num_gpu_blocks=4096, max_model_len=4096)
# Real time (milliseconds per step): long requests stay in flight while a test cancels them.
SLOW_MODEL = "slow-model"
REAL_TIME = MockerConfig(speedup_ratio=1, block_size=4, num_gpu_blocks=8192, max_model_len=8192)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer("smollm2")


def expected_text(tok: Tokenizer, seed: int, prompt_tokens: int, n: int) -> str:
    ids = [pseudo_token(seed, prompt_tokens + k, FAST.vocab_size) for k in range(n)]
    return tok.decode(ids)


async def _holds(check: Callable[[], bool]) -> bool:
    return check()


@dataclass
class Stack:
    fast: RunningWorker
    slow: RunningWorker
    frontend: FrontendServer
    router: router_pb2_grpc.RouterServiceAsyncStub
    http: aiohttp.ClientSession
    channel: grpc.aio.Channel
    discovery: str
    # Request ids the frontend gave to HTTP requests of the current test (from response ids).
    request_ids: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.frontend.http_port}"

    @property
    def kserve(self) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel)

    def _remember(self, doc: Any) -> None:
        if isinstance(doc, dict) and isinstance(doc.get("id"), str):
            rid = doc["id"].split("-", 1)[1]
            if rid not in self.request_ids:
                self.request_ids.append(rid)

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.post(self.base + path, data=data) as r:
            doc = await r.json(content_type=None)
        self._remember(doc)
        return r.status, doc

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
        self._remember(events[0])
        return events

    async def drained(self) -> None:
        """Workers hold no blocks, and the router heard the end of every request made here."""
        for worker in (self.fast, self.slow):
            await eventually(functools.partial(_no_blocks, worker), "the worker freed every block")
        await self.frontend.router.flush()
        for rid in self.request_ids:
            late = await self.router.NotifyFinished(
                router_pb2.NotifyFinishedRequest(request_id=rid, outcome=router_pb2.REQUEST_OUTCOME_FINISHED)
            )
            assert not late.applied, f"the router still tracked request {rid}"
        self.request_ids.clear()


async def _no_blocks(worker: RunningWorker) -> bool:
    return await worker.active_blocks() == 0


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServiceProcess]]:
    with router_process(tmp_path_factory.mktemp("frontend-stack")) as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(router: tuple[str, ServiceProcess]) -> AsyncIterator[Stack]:
    discovery, proc = router
    instance = await wait_for_instance(discovery, "router", proc=proc)
    settings = FrontendSettings(host="127.0.0.1", port=0, http_port=0, discovery=discovery, grace_period=1.0)
    async with (
        running_worker(FAST, discovery=discovery) as fast,
        running_worker(REAL_TIME, discovery=discovery, model=SLOW_MODEL) as slow,
        FrontendServer(settings) as frontend,
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(frontend.address) as channel,
        grpc.aio.insecure_channel(instance.address) as router_channel,
    ):
        s = Stack(
            fast, slow, frontend, router_pb2_grpc.RouterServiceStub(router_channel), http, channel, discovery
        )
        for model in (MODEL, SLOW_MODEL):
            await eventually(functools.partial(_listed, frontend, model), f"{model} listed")
            # The router's worker watch runs on its own schedule: wait until it routes.
            await eventually(functools.partial(_routes, s, model), f"the router routes {model}")
        await s.drained()
        yield s


async def _listed(frontend: FrontendServer, model: str) -> bool:
    return frontend.models.get(model) is not None


async def _routes(stack: Stack, model: str) -> bool:
    status, _ = await stack.post("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1})
    return status == 200


# ---- OpenAI HTTP ----------------------------------------------------------------------------


async def test_completion_text_is_the_detokenized_worker_output(stack: Stack, tokenizer: Tokenizer) -> None:
    s = stack
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


async def test_streaming_and_unary_chat_agree_and_report_usage(stack: Stack, tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    body = {"model": MODEL, "messages": messages, "max_completion_tokens": 20, "seed": 11}
    s = stack
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


async def test_streaming_without_include_usage_sends_no_usage(stack: Stack) -> None:
    s = stack
    events = await s.sse("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 5, "stream": True})
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_a_repeated_prompt_reports_cached_tokens(stack: Stack) -> None:
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    s = stack
    _, first = await s.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
    _, second = await s.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["usage"]["prompt_tokens"]


async def test_a_stop_string_cuts_the_output_and_frees_the_request(
    stack: Stack, tokenizer: Tokenizer
) -> None:
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 40, "seed": 3}
    s = stack
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


async def test_echo_prepends_the_prompt(stack: Stack) -> None:
    s = stack
    _, plain = await s.post(
        "/v1/completions", {"model": MODEL, "prompt": "Echo me", "max_tokens": 4, "seed": 1}
    )
    _, echoed = await s.post(
        "/v1/completions", {"model": MODEL, "prompt": "Echo me", "max_tokens": 4, "seed": 1, "echo": True}
    )
    assert echoed["choices"][0]["text"] == "Echo me" + plain["choices"][0]["text"]


async def test_token_id_prompts_and_stop_token_ids_reach_the_worker(
    stack: Stack, tokenizer: Tokenizer
) -> None:
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
    s = stack
    status, out = await s.post("/v1/completions", body)
    assert status == 200, out
    assert out["usage"]["prompt_tokens"] == 20
    assert out["usage"]["completion_tokens"] == index + 1
    assert out["choices"][0]["finish_reason"] == "stop"
    # The stop token is counted, not shown.
    assert out["choices"][0]["text"] == tokenizer.decode(expected[:index])


async def test_unknown_fields_are_ignored(stack: Stack) -> None:
    s = stack
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
        ("/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "a\\ud800b"}', "surrogate"),
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, "nested"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "a\ud800b"}]},
            "surrogate",
        ),
        # Only an assistant turn may come without content (OpenAI's rule).
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "tool", "content": None}]},
            "messages.0.content",
        ),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, "role"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "text parts",
        ),
    ],
)
async def test_malformed_requests_get_400_with_an_openai_error(
    stack: Stack, path: str, body: Any, fragment: str
) -> None:
    s = stack
    status, out = await s.post(path, body)
    # The server took no harm: the next request is served.
    ok, _ = await s.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    await s.drained()
    assert status == 400, out
    assert out["error"]["code"] == 400 and out["error"]["type"] == "invalid_request_error"
    assert fragment in out["error"]["message"]
    assert ok == 200


async def test_unknown_model_and_path_are_404_and_a_wrong_method_is_405(stack: Stack) -> None:
    s = stack
    status, out = await s.post("/v1/completions", {"model": "no-such-model", "prompt": "x"})
    async with s.http.get(s.base + "/v2/nothing") as r:
        path_status, path_out = r.status, await r.json()
    async with s.http.get(s.base + "/v1/completions") as r:
        method_status, method_out = r.status, await r.json()
    assert status == 404 and "no-such-model" in out["error"]["message"]
    assert path_status == 404 and path_out["error"]["type"] == "not_found_error"
    assert method_status == 405 and method_out["error"]["code"] == 405


async def test_oversized_body_is_413(stack: Stack) -> None:
    body = io.BytesIO(b"{" + b" " * (33 * 1024 * 1024) + b"}")
    async with stack.http.post(stack.base + "/v1/completions", data=body) as r:
        status, out = r.status, await r.json(content_type=None)
    assert status == 413
    assert out["error"]["code"] == 413


async def test_a_client_that_disconnects_mid_stream_frees_the_worker_blocks(stack: Stack) -> None:
    body = {"model": SLOW_MODEL, "prompt": "x " * 40, "max_tokens": 8000, "ignore_eos": True, "stream": True}
    s = stack
    response = await s.http.post(s.base + "/v1/completions", json=body)
    assert response.status == 200
    first = json.loads((await response.content.readline())[6:])
    s.request_ids.append(first["id"].split("-", 1)[1])
    assert await s.slow.active_blocks() > 0
    before = await _samples(
        s, "tokenyard_frontend_model_cancellation_total", "tokenyard_frontend_disconnected_clients"
    )
    response.close()
    # 8000 tokens at milliseconds per step would keep them for seconds: only the cancellation
    # of the worker call frees them this soon.
    await s.drained()
    after = await _samples(
        s, "tokenyard_frontend_model_cancellation_total", "tokenyard_frontend_disconnected_clients"
    )
    assert [b + 1 for b in before] == after


async def _samples(s: Stack, *names: str) -> list[float]:
    """Sums of the named series (every label set) on the frontend's /metrics."""
    async with s.http.get(s.base + "/metrics") as r:
        text = await r.text()
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + "{") or line.startswith(name + " "):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return [totals[n] for n in names]


async def test_a_client_that_gives_up_on_a_unary_request_frees_the_worker_blocks(stack: Stack) -> None:
    body = {"model": SLOW_MODEL, "prompt": "x " * 40, "max_tokens": 8000, "ignore_eos": True}
    s = stack
    pending = asyncio.ensure_future(
        s.http.post(
            s.base + "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "hi"}]}
        )
    )
    await eventually(lambda: _busy(s.slow), "the worker took the request")
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    await s.drained()


async def _busy(worker: RunningWorker) -> bool:
    return await worker.active_blocks() > 0


async def test_health_models_and_metrics(stack: Stack) -> None:
    s = stack
    async with s.http.get(s.base + "/health") as r:
        health = await r.json()
    async with s.http.get(s.base + "/v1/models") as r:
        models = await r.json()
    async with s.http.get(s.base + "/metrics") as r:
        metrics = await r.text()
    assert health["status"] == "healthy" and health["models"] == sorted([MODEL, SLOW_MODEL])
    assert sorted(m["id"] for m in models["data"]) == sorted([MODEL, SLOW_MODEL])
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
        f'tokenyard_frontend_active_requests{{model="{MODEL}"}} 0.0',
        f'tokenyard_frontend_tokenizer_latency_ms_count{{model="{MODEL}",operation="tokenize"}}',
        f'tokenyard_frontend_tokenizer_latency_ms_count{{model="{MODEL}",operation="detokenize"}}',
        "tokenyard_frontend_kv_hit_rate_bucket",
        "tokenyard_frontend_model_migration_limit 3.0",
        f'tokenyard_frontend_model_context_length{{model="{MODEL}"}} 4096.0',
        f'tokenyard_frontend_model_kv_cache_block_size{{model="{MODEL}"}} 4.0',
        "tokenyard_rpc_requests_total",
    ):
        assert name in metrics


# ---- KServe v2 gRPC ---------------------------------------------------------------------------


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _raw_request(
    prompt: bytes, *extra: tuple[str, str, bytes], shape: tuple[int, ...] = (1,), model: str = MODEL
) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor
    inputs = [tensor(name="text_input", datatype="BYTES", shape=shape)]
    raw = [_bytes_element(prompt)]
    for name, dtype, data in extra:
        inputs.append(tensor(name=name, datatype=dtype, shape=[1]))
        raw.append(data)
    return pb.ModelInferRequest(model_name=model, id="req-1", inputs=inputs, raw_input_contents=raw)


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


async def test_kserve_infer_raw_and_typed_contents_agree(stack: Stack, tokenizer: Tokenizer) -> None:
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
    s = stack
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


async def test_kserve_generation_options_arrive_as_inputs_parameters_or_json(
    stack: Stack, tokenizer: Tokenizer
) -> None:
    sampling = json.dumps({"max_tokens": 3, "seed": 4}).encode()
    s = stack
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


async def test_kserve_default_max_tokens_is_16(stack: Stack) -> None:
    s = stack
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
            _raw_request(b"x", ("sampling_parameters", "BYTES", _bytes_element(b'{"max_tokens": NaN}'))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "finite",
        ),
        (
            _raw_request(b"x", ("sampling_parameters", "BYTES", _bytes_element(b'{"top_k": "many"}'))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_k",
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
    stack: Stack, request_: pb.ModelInferRequest, code: grpc.StatusCode, fragment: str
) -> None:
    s = stack
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.kserve.ModelInfer(request_)
    await s.drained()
    assert info.value.code() == code
    assert fragment in (info.value.details() or "")


async def test_kserve_stream_serves_requests_concurrently_and_reports_errors_in_band(
    stack: Stack,
    tokenizer: Tokenizer,
) -> None:
    streaming = ("streaming", "BOOL", b"\x01")
    long_, bad, short, unary = (
        _raw_request(b"long", streaming, _max_tokens(3000), model=SLOW_MODEL),
        _raw_request(b"bad", ("bogus", "BOOL", b"\x01"), model=SLOW_MODEL),
        _raw_request(b"short", streaming, _max_tokens(3), model=SLOW_MODEL),
        _raw_request(b"unary", _max_tokens(5), model=SLOW_MODEL),
    )
    for request, rid in ((long_, "long"), (bad, "bad"), (short, "short"), (unary, "unary")):
        request.id = rid
    s = stack
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
        if len(finals) == 3:
            break
    # The others did not wait for the long request sent first, which is still running; leaving
    # the stream cancels it.
    assert sorted(finals) == ["bad", "short", "unary"]
    call.cancel()
    await s.drained()
    assert list(errors) == ["bad"] and "INVALID_ARGUMENT" in errors["bad"] and "bogus" in errors["bad"]
    assert len(texts["unary"]) == 1
    assert len(texts["short"]) >= 1


async def test_kserve_stream_cancel_frees_the_worker_blocks(stack: Stack) -> None:
    request = _raw_request(b"x " * 40, ("streaming", "BOOL", b"\x01"), _max_tokens(8000), model=SLOW_MODEL)
    s = stack
    call = s.kserve.ModelStreamInfer(iter([request]))
    first = await call.read()
    assert isinstance(first, pb.ModelStreamInferResponse) and not first.error_message
    assert await s.slow.active_blocks() > 0
    call.cancel()
    await s.drained()


async def test_kserve_metadata_and_config_agree(stack: Stack) -> None:
    s = stack
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
        "min_length",
        "exclude_input_in_output",
        "sampling_parameters",
    }
    assert [o.name for o in config.output] == ["text_output", "finish_reason"]
    assert [m.name for m in stats.model_stats] == [MODEL]
    assert sorted((m.name, m.state) for m in index.models) == sorted(
        [(MODEL, "READY"), (SLOW_MODEL, "READY")]
    )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_model_whose_workers_left_is_unavailable_not_unknown(stack: Stack) -> None:
    s = stack
    async with running_worker(FAST, discovery=s.discovery, model="leaving-model"):
        await eventually(functools.partial(_listed, s.frontend, "leaving-model"), "listed")
    await eventually(lambda: _holds(lambda: s.frontend.models.get("leaving-model") is None), "gone")
    status, out = await s.post("/v1/completions", {"model": "leaving-model", "prompt": "x"})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.kserve.ModelInfer(_raw_request(b"x", model="leaving-model"))
    async with s.http.get(s.base + "/v1/models") as r:
        listed = await r.json()
    assert status == 503 and out["error"]["code"] == 503
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "leaving-model" not in [m["id"] for m in listed["data"]]
