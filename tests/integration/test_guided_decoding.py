"""Guided decoding over the worker contract: a CPU worker constrains the real model's output to one
JSON object, or to a JSON Schema (non-ASCII values included), and says so in its model card; what
an engine cannot honour is refused with INVALID_ARGUMENT, never ignored."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest

from tests.fixtures.cpu import CPU, hf_tokenizer, prompt_of
from tests.fixtures.processes import ServiceProcess, wait_for_instance
from tests.fixtures.worker import MODEL, eventually, generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer
from tokenyard.worker.engines.base import GuidedDecoding, GuidedKind
from tokenyard.worker.engines.cpu.guided import GuideFactory
from tokenyard.worker.engines.cpu.model import load_model
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = pytest.mark.integration

EOS = 2
QUESTION = "Describe a person with a JSON object with the keys name and age."
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
TOKYO_QUESTION = "What is the Japanese name of Tokyo, written in Japanese? Answer in JSON."
TOKYO_ENUM = {
    "type": "object",
    "properties": {"name": {"type": "string", "enum": ["東京"]}},
    "required": ["name"],
    "additionalProperties": False,
}
TOKYO_PATTERN = {
    "type": "object",
    "properties": {"japanese": {"type": "string", "pattern": "^東京$"}, "romaji": {"const": "Tokyo"}},
    "required": ["japanese", "romaji"],
    "additionalProperties": False,
}
JSON_OBJECT = worker_pb2.GuidedDecoding(kind=worker_pb2.GUIDED_DECODING_KIND_JSON_OBJECT)


def json_schema(value: dict[str, Any] | str) -> worker_pb2.GuidedDecoding:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return worker_pb2.GuidedDecoding(kind=worker_pb2.GUIDED_DECODING_KIND_JSON_SCHEMA, json_schema=text)


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


def tokens_of(responses: list[worker_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def answer(tokenizer: Any, responses: list[worker_pb2.GenerateResponse]) -> Any:
    """The parsed JSON of a guided output that ended on EOS."""
    tokens = tokens_of(responses)
    assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
    assert tokens[-1] == EOS  # the document ends the output: EOS comes right after it
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    try:
        return json.loads(text)
    except ValueError:
        pytest.fail(f"not JSON: {text!r}")


async def test_a_cpu_worker_answers_with_one_json_object_and_advertises_both_kinds(tokenizer: Any) -> None:
    prompt = prompt_of(tokenizer, QUESTION)
    async with running_worker(MockerConfig(), engine="cpu", cpu=CPU) as w:
        [instance] = await w.discovery.instances("worker")
        # Constrained and free requests share the engine's steps.
        greedy, sampled, short, free = await asyncio.gather(
            w.generate(guided("greedy", prompt, JSON_OBJECT, temperature=0.0)),
            w.generate(guided("sampled", prompt, JSON_OBJECT, temperature=0.8, seed=2)),
            w.generate(guided("short", prompt, JSON_OBJECT, 6, temperature=0.0)),
            w.generate(generate_request("free", prompt, 12)),
        )
    assert instance.model_card is not None
    assert instance.model_card.structured_output == ("json_object", "json_schema")
    for responses in (greedy, sampled):
        assert isinstance(answer(tokenizer, responses), dict)
    assert free[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH and len(tokens_of(free)) == 12
    # Out of tokens before the object closed: the output is a truncated object, as with OpenAI.
    assert short[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH
    factory = GuideFactory.load(load_model(CPU).weights_dir / "tokenizer.json", 49152)
    assert factory is not None
    guide = factory.guide(GuidedDecoding(GuidedKind.JSON_OBJECT), (EOS,))
    for token in tokens_of(short):
        assert bool(guide.allowed()[token])
        guide.accept(token)
    assert not guide.complete, tokenizer.decode(tokens_of(short))


async def test_json_schema_outputs_are_valid_against_their_schema(tokenizer: Any) -> None:
    person = prompt_of(tokenizer, QUESTION)
    tokyo = prompt_of(tokenizer, TOKYO_QUESTION)
    async with running_worker(MockerConfig(), engine="cpu", cpu=CPU) as w:
        greedy, sampled, enum, pattern = await asyncio.gather(
            w.generate(guided("greedy", person, json_schema(PERSON), 64, temperature=0.0)),
            w.generate(
                guided("sampled", person, json_schema(PERSON), 64, temperature=0.9, seed=5, top_p=0.95)
            ),
            w.generate(guided("enum", tokyo, json_schema(TOKYO_ENUM), 32, temperature=0.0)),
            w.generate(guided("pattern", tokyo, json_schema(TOKYO_PATTERN), 48, temperature=0.7, seed=1)),
        )
    for responses in (greedy, sampled):
        jsonschema.validate(answer(tokenizer, responses), PERSON)
    assert answer(tokenizer, enum) == {"name": "東京"}
    assert answer(tokenizer, pattern) == {"japanese": "東京", "romaji": "Tokyo"}


BAD_SCHEMAS = [
    ('{"type": "objectt"}', "Invalid type: objectt"),
    ("{not json", "not valid JSON"),
    ('{"type": "string", "pattern": "(unclosed"}', "unclosed group"),
    ('{"$ref": "#/$defs/nowhere"}', "does not exist"),
]


async def test_a_schema_the_engine_cannot_compile_is_invalid_argument() -> None:
    errors = []
    async with running_worker(MockerConfig(), engine="cpu", cpu=CPU) as w:
        for schema, _ in BAD_SCHEMAS:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await w.generate(guided("bad", [1, 2, 3], json_schema(schema)))
            errors.append(err.value)
        # The engine goes on serving.
        served = await w.generate(guided("good", [1, 2, 3], JSON_OBJECT, 4, temperature=0.0))
    for error, (_, fragment) in zip(errors, BAD_SCHEMAS, strict=True):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error.details() or ""
        assert "guided_decoding.json_schema" in details and fragment in details, details
    assert served[-1].finish_reason in (worker_pb2.FINISH_REASON_STOP, worker_pb2.FINISH_REASON_LENGTH)


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


async def test_response_format_json_object_and_json_schema_through_the_frontend(tmp_path: Path) -> None:
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
            person = await client.chat.completions.create(
                model=MODEL,
                messages=messages,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
                },
                max_tokens=64,
                temperature=0.0,
            )
            tokyo_messages: Any = [{"role": "user", "content": TOKYO_QUESTION}]
            tokyo = await client.chat.completions.create(
                model=MODEL,
                messages=tokyo_messages,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "tokyo", "schema": TOKYO_ENUM},
                },
                max_tokens=32,
                temperature=0.0,
            )
            with pytest.raises(openai.BadRequestError, match="json_schema"):
                await client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {
                            "name": "bad",
                            "schema": {"type": "string", "pattern": "(unclosed"},
                        },
                    },
                )
    finally:
        router.terminate()
        router.close()
    for choice in (reply.choices[0], person.choices[0], tokyo.choices[0]):
        assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict), reply
    jsonschema.validate(json.loads(person.choices[0].message.content or ""), PERSON)
    assert json.loads(tokyo.choices[0].message.content or "") == {"name": "東京"}
