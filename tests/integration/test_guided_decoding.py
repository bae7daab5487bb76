"""Guided decoding over the worker contract: a CPU worker constrains the real model's output to one
JSON object and says so in its model card; kinds an engine cannot honour are refused with
INVALID_ARGUMENT, never ignored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from tests.fixtures.cpu import CPU, hf_tokenizer, prompt_of
from tests.fixtures.processes import ServiceProcess, wait_for_instance
from tests.fixtures.worker import MODEL, eventually, generate_request, running_worker
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer
from tokenyard.worker.engines.cpu.json_constraint import JsonObjectAutomaton
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.v1 import worker_pb2

pytestmark = pytest.mark.integration

JSON_OBJECT = worker_pb2.GuidedDecoding(kind=worker_pb2.GUIDED_DECODING_KIND_JSON_OBJECT)
JSON_SCHEMA = worker_pb2.GuidedDecoding(
    kind=worker_pb2.GUIDED_DECODING_KIND_JSON_SCHEMA, json_schema='{"type":"object"}'
)
QUESTION = "Describe a person with a JSON object with the keys name and age."


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return hf_tokenizer()


def guided(
    request_id: str,
    prompt: list[int],
    decoding: worker_pb2.GuidedDecoding,
    max_tokens: int = 48,
    **sampling: Any,
) -> worker_pb2.GenerateRequest:
    request = generate_request(request_id, prompt, max_tokens)
    request.guided_decoding.CopyFrom(decoding)
    for name, value in sampling.items():
        setattr(request.sampling, name, value)
    return request


async def test_a_cpu_worker_answers_with_one_json_object_and_advertises_it(tokenizer: Any) -> None:
    prompt = prompt_of(tokenizer, QUESTION)
    async with running_worker(MockerConfig(), engine="cpu", cpu=CPU) as w:
        [instance] = await w.discovery.instances("worker")
        greedy = await w.generate(guided("greedy", prompt, JSON_OBJECT, temperature=0.0))
        sampled = await w.generate(guided("sampled", prompt, JSON_OBJECT, temperature=0.8, seed=2))
        short = await w.generate(guided("short", prompt, JSON_OBJECT, 6, temperature=0.0))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.generate(guided("schema", prompt, JSON_SCHEMA))
    assert instance.model_card is not None and instance.model_card.structured_output == ("json_object",)
    for responses in (greedy, sampled):
        tokens = [t for r in responses for t in r.token_ids]
        assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
        assert tokens[-1] == 2  # the object ends the output: EOS comes right after it
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert isinstance(json.loads(text), dict), text
    # Out of tokens before the object closed: the output is a truncated object, as with OpenAI.
    assert short[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH
    truncated = tokenizer.decode([t for r in short for t in r.token_ids])
    automaton = JsonObjectAutomaton()
    assert automaton.advance_text(truncated) and not automaton.complete, truncated
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "json_schema" in (err.value.details() or "") and "supports json_object" in (
        err.value.details() or ""
    )


async def test_a_malformed_guided_decoding_is_invalid() -> None:
    async with running_worker(MockerConfig()) as w:
        for decoding in (
            worker_pb2.GuidedDecoding(),
            worker_pb2.GuidedDecoding(kind=worker_pb2.GUIDED_DECODING_KIND_JSON_SCHEMA),
            worker_pb2.GuidedDecoding(kind=worker_pb2.GUIDED_DECODING_KIND_JSON_OBJECT, json_schema="{}"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await w.generate(guided("bad", [1, 2, 3], decoding))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "guided_decoding" in (err.value.details() or "")


async def test_the_mocker_refuses_guided_decoding_instead_of_ignoring_it() -> None:
    async with running_worker(MockerConfig()) as w:
        [instance] = await w.discovery.instances("worker")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.generate(guided("json", [1, 2, 3], JSON_OBJECT))
        # The same request without the constraint is served.
        served = await w.generate(generate_request("free", [1, 2, 3], 4))
    assert instance.model_card is not None and instance.model_card.structured_output == ()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mocker engine cannot constrain its output to json_object" in (err.value.details() or "")
    assert served[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH


async def test_response_format_json_object_through_the_frontend(tmp_path: Path) -> None:
    discovery = f"dir://{tmp_path / 'discovery'}"
    router = ServiceProcess(
        ["router", "--port", "0", "--metrics-port", "0", "--discovery", discovery, "--mode", "round-robin"],
        tmp_path / "router.log",
    )
    try:
        await wait_for_instance(discovery, "router", proc=router)
        settings = FrontendSettings(
            host="127.0.0.1", port=0, http_port=0, discovery=discovery, grace_period=1.0
        )
        async with (
            running_worker(MockerConfig(), engine="cpu", cpu=CPU, discovery=discovery),
            FrontendServer(settings) as frontend,
            openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{frontend.http_port}/v1",
                api_key="unused",
                max_retries=0,
                timeout=60,
            ) as client,
        ):

            async def served() -> bool:
                try:
                    await client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
                except openai.APIStatusError:
                    return False
                return True

            await eventually(served, "the frontend routes to the CPU worker")
            messages: Any = [{"role": "user", "content": QUESTION}]
            reply = await client.chat.completions.create(
                model=MODEL,
                messages=messages,
                response_format={"type": "json_object"},
                max_tokens=48,
                temperature=0.0,
            )
            with pytest.raises(openai.BadRequestError, match="supports only json_object"):
                await client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "person", "schema": {"type": "object"}},
                    },
                )
    finally:
        router.terminate()
        router.close()
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content or ""), dict), choice.message.content
