"""A split deployment: a KV router process, one prefill and one decode mocker worker and frontends
in the test's process, meeting in a discovery directory.

* Every surface (OpenAI completions and chat through the openai package, KServe ModelInfer and
  ModelStreamInfer) answers a split request with one stream, whose text is the decode worker's,
  whose usage covers both stages (the prompt, the prefill worker's cache hits), and whose two
  stages the router hears the end of.
* Conditional disaggregation: once the decode worker holds a prompt (its KV events reached the
  router), a request for it, or for most of it, is prefilled by the decode worker and never
  reaches the prefill pool; a new prompt still goes there. Counted in
  ``tokenyard_frontend_disagg_decisions_total``.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.frontend import router_process
from tests.fixtures.processes import ServiceProcess, wait_for_instance
from tests.fixtures.worker import MODEL, RunningWorker, eventually, running_worker
from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.common.hashing import local_block_hashes, salt_hash
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer
from tokenyard.frontend.tokenizer import Tokenizer, load_tokenizer
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.executor import pseudo_token

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

BLOCK = 4
# Speedup 0: steps never sleep. Blocks of 4 tokens, so short prompts fill blocks.
FAST = MockerConfig(speedup_ratio=0, block_size=BLOCK, num_gpu_blocks=8192, max_model_len=8192)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer("smollm2")


@dataclass
class Split:
    prefill: RunningWorker
    decode: RunningWorker
    # Disaggregates every request (--disagg-policy always).
    always: FrontendServer
    # The default policy (isl_or_load).
    conditional: FrontendServer
    router: router_pb2_grpc.RouterServiceAsyncStub
    http: aiohttp.ClientSession
    clients: dict[int, openai.AsyncOpenAI] = field(default_factory=dict)

    def openai(self, frontend: FrontendServer) -> openai.AsyncOpenAI:
        client = self.clients.get(frontend.http_port)
        if client is None:
            client = self.clients[frontend.http_port] = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{frontend.http_port}/v1", api_key="unused"
            )
        return client

    async def metric(self, frontend: FrontendServer, name: str, **labels: str) -> float:
        async with self.http.get(f"http://127.0.0.1:{frontend.http_port}/metrics") as r:
            text = await r.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    async def decisions(self, frontend: FrontendServer, decision: str, reason: str = "") -> float:
        labels = {"decision": decision, **({"reason": reason} if reason else {})}
        return await self.metric(frontend, "tokenyard_frontend_disagg_decisions_total", **labels)

    async def ended(self, *request_ids: str) -> None:
        """The router tracks neither stage of these requests any more, and no worker holds blocks
        for a running request."""
        for worker in (self.prefill, self.decode):
            await eventually(functools.partial(_no_blocks, worker), "the worker freed every block")
        for frontend in (self.always, self.conditional):
            await frontend.router.flush()
        for rid in request_ids:
            for stage in (rid, f"{rid}:prefill"):
                late = await self.router.NotifyFinished(
                    router_pb2.NotifyFinishedRequest(
                        request_id=stage, outcome=router_pb2.REQUEST_OUTCOME_FINISHED
                    )
                )
                assert not late.applied, f"the router still tracked {stage}"


async def _no_blocks(worker: RunningWorker) -> bool:
    return await worker.active_blocks() == 0


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServiceProcess]]:
    with router_process(tmp_path_factory.mktemp("disagg"), "--mode", "kv") as r:
        yield r


def _frontend_settings(discovery: str, **settings: Any) -> FrontendSettings:
    return FrontendSettings(
        host="127.0.0.1", port=0, http_port=0, discovery=discovery, grace_period=1.0, **settings
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def split(router: tuple[str, ServiceProcess]) -> AsyncIterator[Split]:
    discovery, proc = router
    instance = await wait_for_instance(discovery, "router", proc=proc)
    async with (
        running_worker(FAST, discovery=discovery, role="prefill") as prefill,
        running_worker(FAST, discovery=discovery, role="decode") as decode,
        FrontendServer(_frontend_settings(discovery, disagg_policy="always")) as always,
        FrontendServer(_frontend_settings(discovery)) as conditional,
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(instance.address) as router_channel,
    ):
        s = Split(
            prefill, decode, always, conditional, router_pb2_grpc.RouterServiceStub(router_channel), http
        )
        for frontend in (always, conditional):
            await eventually(functools.partial(_split, frontend), "the frontend sees a split model")
        # The router's worker watch runs on its own schedule: wait until it routes both pools.
        await eventually(functools.partial(_remote, s), "a request is prefilled remotely", 30)
        try:
            yield s
        finally:
            for client in s.clients.values():
                await client.close()


async def _split(frontend: FrontendServer) -> bool:
    served = frontend.models.get(MODEL)
    return served is not None and served.split


async def _remote(s: Split) -> bool:
    before = await s.decisions(s.always, "remote")
    try:
        await s.openai(s.always).completions.create(model=MODEL, prompt="warm up", max_tokens=1)
    except openai.APIError:
        return False
    return await s.decisions(s.always, "remote") > before


def _expected(tok: Tokenizer, seed: int, prompt_tokens: int, n: int) -> str:
    return tok.decode([pseudo_token(seed, prompt_tokens + k, FAST.vocab_size) for k in range(n)])


def _rid(response_id: str) -> str:
    return response_id.split("-", 1)[1]


# ---- one stream, usage over both stages, every surface ----------------------------------------


async def test_openai_streams_a_split_completion_as_one_stream(split: Split, tokenizer: Tokenizer) -> None:
    s = split
    prompt = "Split serving: the prefill worker computes this prompt, the decode worker continues it."
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=True))
    client = s.openai(s.always)
    remote_before = await s.decisions(s.always, "remote", "always")
    prefills_before = await s.metric(s.always, "tokenyard_frontend_disagg_prefill_seconds_count")

    async def stream() -> tuple[str, str, Any, list[str]]:
        chunks = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts, finish, usage, ids = [], "", None, []
        async for chunk in chunks:
            ids.append(chunk.id)
            for choice in chunk.choices:
                texts.append(choice.text)
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        return "".join(texts), finish, usage, ids

    first_text, first_finish, first_usage, first_ids = await stream()
    again_text, _, again_usage, again_ids = await stream()

    assert len(set(first_ids)) == 1, "one stream, one id"
    assert first_text == again_text == _expected(tokenizer, 5, n_prompt, 12)
    assert first_finish == "length"
    assert (first_usage.prompt_tokens, first_usage.completion_tokens) == (n_prompt, 12)
    # The cached tokens are the prefill worker's prefix-cache hits: none the first time, the
    # prompt's full blocks but its last token the second (the decode worker, which imported the
    # whole prompt, would say every token).
    assert first_usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < again_usage.prompt_tokens_details.cached_tokens < n_prompt
    assert await s.decisions(s.always, "remote", "always") == remote_before + 2
    assert await s.metric(s.always, "tokenyard_frontend_disagg_prefill_seconds_count") == prefills_before + 2
    await s.ended(_rid(first_ids[0]), _rid(again_ids[0]))


async def test_openai_chat_unary_and_streaming_agree(split: Split) -> None:
    s = split
    client = s.openai(s.always)
    messages: Any = [{"role": "user", "content": "Tell me about disaggregated serving."}]
    unary = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, seed=8)
    parts: list[str] = []
    usage = None
    async for chunk in await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=9,
        seed=8,
        stream=True,
        stream_options={"include_usage": True},
    ):
        parts.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    assert unary.choices[0].message.content == "".join(parts)
    assert unary.usage is not None and usage is not None
    assert unary.usage.completion_tokens == usage.completion_tokens == 9
    assert unary.usage.prompt_tokens == usage.prompt_tokens
    await s.ended(_rid(unary.id))


def _infer(
    prompt: bytes, max_tokens: int, seed: int, request_id: str, stream: bool = False
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id=request_id)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(prompt)) + prompt)
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    request.raw_input_contents.append(struct.pack("<i", max_tokens))
    if stream:
        request.inputs.add(name="stream", datatype="BOOL", shape=[1])
        request.raw_input_contents.append(b"\x01")
    request.parameters["seed"].int64_param = seed
    return request


def _text(response: pb.ModelInferResponse) -> tuple[str, str]:
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        out[tensor.name] = raw[4:].decode()
    return out["text_output"], out["finish_reason"]


async def test_kserve_infer_and_stream_infer_serve_split_requests(split: Split, tokenizer: Tokenizer) -> None:
    s = split
    prompt = b"KServe clients see the decode worker's tokens"
    n_prompt = len(tokenizer.encode(prompt.decode(), add_special_tokens=True))
    expected = _expected(tokenizer, 13, n_prompt, 6)
    remote_before = await s.decisions(s.always, "remote", "always")
    async with grpc.aio.insecure_channel(s.always.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        unary = await stub.ModelInfer(_infer(prompt, 6, 13, "kserve-unary"))
        assert _text(unary) == (expected, "length")

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            yield _infer(prompt, 6, 13, "kserve-stream", stream=True)

        parts, finishes = [], []
        async for response in stub.ModelStreamInfer(requests()):
            assert not response.error_message, response.error_message
            text, finish = _text(response.infer_response)
            parts.append(text)
            finishes.append(finish)
    assert "".join(parts) == expected
    # One stream: text deltas, then the finish on the last response only.
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert await s.decisions(s.always, "remote", "always") == remote_before + 2
    await s.ended()


# ---- conditional disaggregation --------------------------------------------------------------


def _prompt(seed: int, n: int) -> list[int]:
    return [1000 + (seed * 7919 + i * 104_729) % 30_000 for i in range(n)]


async def _decode_holds(s: Split, tokens: list[int]) -> bool:
    hashes = local_block_hashes(tokens, BLOCK, salt_hash("", ""))
    reply = await s.router.QueryOverlap(
        router_pb2.QueryOverlapRequest(
            model=MODEL, block_hashes=hashes, worker_ids=[s.decode.server.runtime.instance_id]
        )
    )
    return any(o.matched_blocks == len(hashes) for o in reply.overlaps)


async def test_prompts_mostly_cached_on_the_decode_worker_skip_the_prefill_pool(split: Split) -> None:
    s = split
    frontend = s.conditional
    client = s.openai(frontend)
    shared = _prompt(1, 400)

    async def complete(tokens: list[int]) -> str:
        reply = await client.completions.create(model=MODEL, prompt=tokens, max_tokens=4)
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        return reply.id

    counts = {
        key: await s.decisions(frontend, *key)
        for key in (("remote", "uncached"), ("local", "cached"), ("remote", ""), ("local", ""))
    }
    prefills = await s.metric(frontend, "tokenyard_frontend_disagg_prefill_seconds_count")

    # Nothing cached anywhere: the prefill pool computes it, and the decode worker takes its KV.
    first = await complete(shared)
    assert await s.decisions(frontend, "remote", "uncached") == counts[("remote", "uncached")] + 1
    await eventually(
        functools.partial(_decode_holds, s, shared), "the router sees the prompt on the decode worker"
    )

    # The same prompt, and one that extends it by a little: mostly cached on the decode worker
    # (eff_isl < 2048 and under 0.7 of the prompt), so the decode worker prefills them itself.
    again = await complete(shared)
    longer = await complete([*shared, *_prompt(2, 40)])
    assert await s.decisions(frontend, "local", "cached") == counts[("local", "cached")] + 2
    # ... and the prefill pool never saw them.
    assert await s.metric(frontend, "tokenyard_frontend_disagg_prefill_seconds_count") == prefills + 1

    # A prompt the decode worker does not hold still goes to the prefill pool.
    fresh = await complete(_prompt(3, 400))
    assert await s.decisions(frontend, "remote", "uncached") == counts[("remote", "uncached")] + 2
    assert await s.decisions(frontend, "remote") == counts[("remote", "")] + 2
    assert await s.decisions(frontend, "local") == counts[("local", "")] + 2
    assert await s.metric(frontend, "tokenyard_frontend_disagg_prefill_seconds_count") == prefills + 2
    await s.ended(*(_rid(r) for r in (first, again, longer, fresh)))


async def test_metrics_name_the_pools(split: Split) -> None:
    s = split
    instance = await wait_for_instance(s.always.settings.discovery, "router")
    async with s.http.get(f"http://{instance.metrics_address}/metrics") as r:
        text = await r.text()
    samples = {
        (sample.name, sample.labels.get("pool")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    # The router counts each pool's decisions: both pools served requests by now.
    assert samples[("tokenyard_router_pool_decisions_total", "prefill")] > 0
    assert samples[("tokenyard_router_pool_decisions_total", "decode")] > 0

    async def gauges_refreshed() -> bool:
        async with s.http.get(f"http://{instance.metrics_address}/metrics") as r:
            text = await r.text()
        return 'tokenyard_router_pool_workers{pool="prefill"} 1.0' in text and (
            'tokenyard_router_pool_workers{pool="decode"} 1.0' in text
        )

    await eventually(gauges_refreshed, "the router's pool gauges", 5)
