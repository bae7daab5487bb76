"""Reasoning and tool calls parsed out of a model's output, through the real frontend, router and
the openai package: the worker here is a scripted one (real gRPC, the worker contract) whose
model card names the ``think`` reasoning parser and the ``hermes`` tool-call parser and whose
output is text the test chooses, tokenized with the model's real tokenizer."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import openai
import pytest
import pytest_asyncio
from openai.types.responses import ResponseCompletedEvent

from tests.fixtures.frontend import router_process
from tests.fixtures.processes import ServiceProcess, wait_for_instance
from tests.fixtures.worker import eventually
from tests.integration.test_router_service import ScriptedWorker
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Instance, ModelCard, new_instance_id, open_discovery
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer
from tokenyard.frontend.tokenizer import load_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MODEL = "thinker"
PLAIN = "plain"
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
THOUGHT = "The user wants weather; I should call the tool."
SCRIPT = f'<think>{THOUGHT}</think>\n\nLet me check.<tool_call>{{"name": "weather", "arguments": {{"city": "Paris"}}}}</tool_call>'


class TextWorker(ScriptedWorker):
    """Generate answers every request with ``script``, three tokens per message."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer("smollm2")
        self.script = ""
        self.requests: list[worker_pb2.GenerateRequest] = []

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[worker_pb2.GenerateResponse]:
        self.requests.append(request)
        ids = self.tokenizer.encode(self.script)
        for i in range(0, len(ids), 3):
            yield worker_pb2.GenerateResponse(token_ids=ids[i : i + 3])
        yield worker_pb2.GenerateResponse(
            finish_reason=worker_pb2.FINISH_REASON_STOP,
            usage=worker_pb2.Usage(prompt_tokens=len(request.token_ids), completion_tokens=len(ids)),
        )


@contextlib.asynccontextmanager
async def text_worker(discovery_url: str, card: ModelCard) -> AsyncIterator[TextWorker]:
    servicer = TextWorker()  # type: ignore[abstract]  # serves what the router and frontend call
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    discovery = open_discovery(discovery_url, ttl=5)
    await discovery.register(
        Instance(new_instance_id(), "worker", "aggregated", f"127.0.0.1:{port}", model_card=card)
    )
    try:
        yield servicer
    finally:
        await discovery.close()
        await server.stop(None)


@dataclass
class Stack:
    worker: TextWorker
    plain_worker: TextWorker
    frontend: FrontendServer
    client: openai.AsyncOpenAI
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.frontend.http_port}"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServiceProcess]]:
    with router_process(tmp_path_factory.mktemp("output-parsing")) as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(router: tuple[str, ServiceProcess]) -> AsyncIterator[Stack]:
    discovery, proc = router
    await wait_for_instance(discovery, "router", proc=proc)
    settings = FrontendSettings(host="127.0.0.1", port=0, http_port=0, discovery=discovery, grace_period=1.0)
    card = ModelCard(MODEL, "smollm2", 16, 4096, 100, "scripted", "aggregated", "think", "hermes")
    plain = ModelCard(
        PLAIN, "smollm2", 16, 4096, 100, "scripted", "aggregated", structured_output=("json_object",)
    )
    async with (
        text_worker(discovery, card) as worker,
        text_worker(discovery, plain) as plain_worker,
        FrontendServer(settings) as frontend,
        aiohttp.ClientSession() as http,
    ):
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{frontend.http_port}/v1", api_key="unused", max_retries=0, timeout=30
        )
        s = Stack(worker, plain_worker, frontend, client, http)

        async def routes() -> bool:
            for model in (MODEL, PLAIN):
                body = {"model": model, "prompt": "hi", "max_tokens": 1}
                async with http.post(s.base + "/v1/completions", json=body) as r:
                    if r.status != 200:
                        return False
            return True

        await eventually(routes, "both models are served")
        yield s
        await client.close()


async def test_chat_separates_reasoning_and_tool_calls(stack: Stack) -> None:
    stack.worker.script = SCRIPT
    messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
    unary = await stack.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    choice = unary.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert (
        choice.message.model_extra is not None and choice.message.model_extra["reasoning_content"] == THOUGHT
    )
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")

    stream = await stack.client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], stream=True
    )
    content, reasoning, names, args, finish = "", "", [], "", None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for tc in delta.tool_calls or ():
            if tc.function and tc.function.name:
                names.append(tc.function.name)
            args += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert (content, reasoning, names, finish) == ("Let me check.", THOUGHT, ["weather"], "tool_calls")
    assert json.loads(args) == {"city": "Paris"}


async def test_without_tools_the_tags_stay_text_but_reasoning_is_still_separated(stack: Stack) -> None:
    stack.worker.script = SCRIPT
    messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
    unary = await stack.client.chat.completions.create(model=MODEL, messages=messages)
    choice = unary.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content is not None and choice.message.content.startswith(
        "Let me check.<tool_call>"
    )


async def test_responses_stream_reasoning_message_and_function_call(stack: Stack) -> None:
    stack.worker.script = SCRIPT
    tools: Any = [{"type": "function", "name": "weather", "parameters": WEATHER["function"]["parameters"]}]
    unary = await stack.client.responses.create(model=MODEL, input="Weather in Paris?", tools=tools)
    assert [item.type for item in unary.output] == ["reasoning", "message", "function_call"]
    assert unary.output_text == "Let me check."
    stream = await stack.client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=tools, stream=True
    )
    kinds = [event.type async for event in stream]
    assert "response.reasoning_text.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    assert kinds[-1] == "response.completed"
    stream = await stack.client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=tools, stream=True
    )
    last = [event async for event in stream][-1]
    assert isinstance(last, ResponseCompletedEvent)
    call = last.response.output[-1]
    assert call.type == "function_call" and call.name == "weather"
    assert json.loads(call.arguments) == {"city": "Paris"}


@pytest.mark.parametrize(
    ("model", "extra", "fragment"),
    [
        (MODEL, {"response_format": {"type": "json_object"}}, "it supports no structured output"),
        (
            PLAIN,
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                }
            },
            "cannot constrain its output to json_schema (it supports only json_object)",
        ),
        (
            MODEL,
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                }
            },
            "cannot constrain its output",
        ),
        (MODEL, {"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
        (PLAIN, {"tools": [WEATHER]}, "--tool-call-parser"),
        (
            MODEL,
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        (MODEL, {"response_format": {"type": "xml"}}, "response_format"),
    ],
)
async def test_what_the_engine_cannot_honour_is_a_clear_400(
    stack: Stack, model: str, extra: dict[str, Any], fragment: str
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    async with stack.http.post(stack.base + "/v1/chat/completions", json=body) as r:
        status, out = r.status, await r.json()
    assert status == 400, out
    assert fragment in out["error"]["message"]
    # The same without the offending field is served.
    stack.worker.script = "fine"
    async with stack.http.post(
        stack.base + "/v1/chat/completions", json={"model": model, "messages": body["messages"]}
    ) as r:
        assert r.status == 200


async def test_response_format_reaches_a_worker_whose_engine_honours_it(stack: Stack) -> None:
    stack.plain_worker.script = '{"city": "Paris"}'
    stack.plain_worker.requests.clear()
    reply = await stack.client.chat.completions.create(
        model=PLAIN, messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"}
    )
    assert json.loads(reply.choices[0].message.content or "") == {"city": "Paris"}
    [request] = stack.plain_worker.requests
    assert request.guided_decoding.kind == worker_pb2.GUIDED_DECODING_KIND_JSON_OBJECT
    assert request.guided_decoding.json_schema == ""
    # Without response_format the worker is asked for free text.
    await stack.client.chat.completions.create(model=PLAIN, messages=[{"role": "user", "content": "hi"}])
    assert not stack.plain_worker.requests[-1].HasField("guided_decoding")


async def test_a_conversation_with_a_tool_call_turn_and_null_content_is_served(stack: Stack) -> None:
    stack.worker.script = "It is sunny in Paris."
    messages: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    reply = await stack.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert reply.choices[0].message.content == "It is sunny in Paris."
    assert reply.choices[0].finish_reason == "stop"
