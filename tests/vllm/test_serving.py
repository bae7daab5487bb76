"""The vLLM engine serving through the whole path: OpenAI HTTP and KServe v2 clients, a frontend, a
router in kv mode and a worker running vLLM: real answers, guided JSON, bad input that does not
disturb the rest, stop strings, cancellation that reaches vLLM, and prefix-cache hits in usage."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp
import grpc
import jsonschema
import openai
import pytest

from tests.fixtures.vllm import Stack, chat_prompt, child_env
from tests.fixtures.worker import MODEL, eventually
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import open_discovery

PARIS = "What is the capital of France?"

TRITON_CLIENT = r"""
import json, queue, sys
import numpy as np
import tritonclient.grpc as grpcclient

url, model, text = sys.argv[1], sys.argv[2], sys.argv[3]
client = grpcclient.InferenceServerClient(url)

def tensor(name, dtype, value):
    t = grpcclient.InferInput(name, [1], dtype)
    t.set_data_from_numpy(np.array([value], dtype={"BYTES": object, "INT32": np.int32, "BOOL": bool}[dtype]))
    return t

inputs = [tensor("text_input", "BYTES", text.encode()), tensor("max_tokens", "INT32", 16)]
unary = client.infer(model, inputs, request_id="paris-unary")
responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)))
client.async_stream_infer(model, inputs + [tensor("streaming", "BOOL", True)], request_id="paris-stream")
pieces, finish = [], ""
while True:
    result, error = responses.get(timeout=120)
    if error is not None:
        raise SystemExit(str(error))
    pieces.append(result.as_numpy("text_output")[0].decode())
    finish = result.as_numpy("finish_reason")[0].decode()
    if result.get_response().parameters["triton_final_response"].bool_param:
        break
client.stop_stream()
print(json.dumps({
    "unary": unary.as_numpy("text_output")[0].decode(),
    "unary_finish": unary.as_numpy("finish_reason")[0].decode(),
    "stream": "".join(pieces),
    "stream_finish": finish,
}))
"""


async def test_the_capital_of_france_over_openai_chat(stack: Stack) -> None:
    async with stack.openai() as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PARIS}], max_tokens=24, temperature=0.0
        )
        streamed = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PARIS}],
            max_tokens=24,
            temperature=0.0,
            stream=True,
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in streamed if chunk.choices]
    assert "Paris" in (reply.choices[0].message.content or ""), reply
    assert reply.choices[0].finish_reason == "stop"
    assert "".join(pieces) == reply.choices[0].message.content


async def test_the_capital_of_france_over_kserve_with_tritonclient(stack: Stack, tokenizer: Any) -> None:
    # KServe's text_input is a completion prompt: the chat template is applied here.
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PARIS}], add_generation_prompt=True, tokenize=False
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", TRITON_CLIENT, stack.frontend.address, MODEL, text],
        capture_output=True,
        text=True,
        timeout=180,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "Paris" in out["unary"] and out["unary_finish"] == "stop", out
    assert out["stream"] == out["unary"] and out["stream_finish"] == "stop", out


async def test_the_worker_describes_the_vllm_engine(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.worker.address) as channel:
        described = await worker_pb2_grpc.WorkerServiceStub(channel).Describe(
            worker_pb2.DescribeRequest(), timeout=10
        )
    discovery = open_discovery(stack.discovery)
    try:
        (registered,) = await discovery.instances("worker")
    finally:
        await discovery.close()
    card = described.model_card
    info = stack.engine.info()
    assert described.engine == "vllm" and described.publishes_kv_events
    assert card.kv_cache_block_size == info.block_size == 32
    assert card.total_kv_blocks == info.total_kv_blocks > 50
    assert card.context_length == 2048
    assert list(card.eos_token_ids) == [2]
    assert registered.model_card is not None
    assert set(registered.model_card.structured_output) == {"json_object", "json_schema"}


GREETING = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Zürich", "Café de Paris", "東京"]},
        "greeting": {"type": "string", "maxLength": 40},
        "visitors": {"type": "integer", "minimum": 0},
    },
    "required": ["city", "greeting", "visitors"],
    "additionalProperties": False,
}


async def test_json_schema_output_is_valid_and_keeps_non_ascii_text(stack: Stack) -> None:
    async with stack.openai() as client:
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": question}],
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "greeting", "schema": GREETING, "strict": True},
                    },
                    max_tokens=96,
                    temperature=0.0,
                )
                for question in (
                    "Pick a city and greet its visitors, as JSON.",
                    "Describe Tokyo for tourists in JSON: its name, a greeting, how many visitors a year.",
                )
            )
        )
        obj = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": "Describe a cat as a JSON object with the keys name and age."}
            ],
            response_format={"type": "json_object"},
            max_tokens=160,
            temperature=0.0,
        )
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        doc = json.loads(choice.message.content or "")
        jsonschema.validate(doc, GREETING)
        assert any(ord(c) > 127 for c in doc["city"]), doc  # every allowed city is non-ASCII
    assert obj.choices[0].finish_reason == "stop", obj
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


async def test_an_invalid_schema_is_400(stack: Stack) -> None:
    async with stack.openai() as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": PARIS}],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "bad", "schema": {"type": "string", "pattern": "(unclosed"}},
                },
                max_tokens=8,
            )


async def test_a_prompt_over_the_context_is_400_while_others_flow(stack: Stack) -> None:
    context = stack.engine.info().context_length
    async with stack.openai() as client:
        normal = asyncio.create_task(
            client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0.0)
        )
        too_long = [1000 + (i % 20000) for i in range(context + 10)]
        with pytest.raises(openai.BadRequestError) as raised:
            await client.completions.create(model=MODEL, prompt=too_long, max_tokens=4)
        reply = await normal
        after = await client.completions.create(model=MODEL, prompt="Twice upon a time", max_tokens=4)
    assert "context" in str(raised.value).lower() or "token" in str(raised.value).lower()
    assert reply.choices[0].text and reply.usage is not None and reply.usage.completion_tokens > 0
    assert after.choices[0].text


async def test_the_worker_refuses_a_prompt_over_the_context_with_invalid_argument(stack: Stack) -> None:
    context = stack.engine.info().context_length
    request = worker_pb2.GenerateRequest(request_id="too-long", model=MODEL, token_ids=[7] * context)
    async with grpc.aio.insecure_channel(stack.worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.Generate(request, timeout=60):
                pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_stop_string_ends_the_output_before_it(stack: Stack) -> None:
    async with stack.openai() as client:
        free = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PARIS}], max_tokens=24, temperature=0.0
        )
        stopped = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PARIS}],
            max_tokens=24,
            temperature=0.0,
            stop=["Paris"],
        )
    text = free.choices[0].message.content or ""
    assert "Paris" in text
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index("Paris")]


async def test_a_client_that_disconnects_aborts_the_vllm_request(stack: Stack) -> None:
    engine = stack.engine
    body = {
        "model": MODEL,
        "prompt": "Count from one to one thousand: one, two, three,",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    async with aiohttp.ClientSession() as http:
        response = await http.post(stack.http + "/v1/completions", json=body)
        assert response.status == 200
        chunks = 0
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunks += 1
            if chunks >= 3:
                break
        assert engine.in_flight == 1
        response.close()  # the client goes away mid-stream

    async def gone() -> bool:
        return bool(engine.in_flight == 0 and engine.unfinished_in_vllm() == 0)

    await eventually(gone, "the vLLM request is aborted", timeout=30)
    # vLLM's scheduler reports after its steps: one more request, and its last step shows nothing
    # running and no KV block in use (the aborted request left nothing behind).
    async with stack.openai() as client:
        await client.completions.create(model=MODEL, prompt="One more", max_tokens=4)

    async def idle() -> bool:
        view = engine.scheduler_view
        return bool(view is not None and view.running == 0 and view.waiting == 0 and view.kv_usage == 0.0)

    await eventually(idle, "vLLM's scheduler is idle", timeout=30)
    assert engine.load()[0].running == 0


async def test_a_repeated_prompt_reports_cached_tokens(stack: Stack) -> None:
    prompt = " ".join(f"word{i}" for i in range(120))  # several 32-token blocks
    async with stack.openai() as client:
        first = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0)
        start = time.monotonic()
        second = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0)
        assert time.monotonic() - start < 60
    assert first.usage is not None and second.usage is not None
    prompt_tokens = second.usage.prompt_tokens
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    # Whole blocks are reused; the last prompt token is always computed again.
    assert details.cached_tokens >= (prompt_tokens - 1) // 32 * 32 - 32 > 0, second.usage
    assert second.choices[0].text == first.choices[0].text


async def test_the_worker_streams_tokens_with_stop_token_ids_and_min_tokens(
    stack: Stack, tokenizer: Any
) -> None:
    prompt = chat_prompt(tokenizer, PARIS)
    async with grpc.aio.insecure_channel(stack.worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        free = [r async for r in stub.Generate(_request("free", prompt, 24), timeout=120)]
        tokens = [t for r in free for t in r.token_ids]
        assert tokens[-1] == 2 and free[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
        # Stop on the third token the model chose: it is the last one out.
        stop_at = tokens[2]
        stopped_request = _request("stopped", prompt, 24)
        stopped_request.stop.stop_token_ids.append(stop_at)
        stopped = [r async for r in stub.Generate(stopped_request, timeout=120)]
        long_request = _request("min", prompt, 12)
        long_request.stop.min_tokens = 12
        at_least = [r async for r in stub.Generate(long_request, timeout=120)]
    assert [t for r in stopped for t in r.token_ids] == tokens[: tokens.index(stop_at) + 1]
    assert stopped[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
    assert len([t for r in at_least for t in r.token_ids]) == 12
    assert at_least[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH
    assert len(free) > 2  # streamed, not one final message


def _request(request_id: str, prompt: list[int], max_tokens: int) -> worker_pb2.GenerateRequest:
    request = worker_pb2.GenerateRequest(request_id=request_id, model=MODEL, token_ids=prompt)
    request.stop.max_tokens = max_tokens
    request.sampling.temperature = 0.0
    return request
