"""A worker running the CPU engine (``--engine cpu``), over real gRPC: it answers a real question,
describes the engine, and hands a prefill's KV bytes out with FetchKvBlocks."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.cpu import CPU, hf_tokenizer, prompt_of
from tests.fixtures.worker import generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return hf_tokenizer()


async def test_a_cpu_worker_answers_with_the_real_model(tokenizer: Any) -> None:
    prompt = prompt_of(tokenizer, "What is the capital of France?")
    async with running_worker(MockerConfig(), engine="cpu", cpu=CPU) as w:
        request = generate_request("paris", prompt, 16)
        request.sampling.temperature = 0.0
        responses = await w.generate(request)
        described = await w.stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
    tokens = [t for r in responses for t in r.token_ids]
    assert "Paris" in tokenizer.decode(tokens)
    assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
    assert described.engine == "cpu" and described.publishes_kv_events
    card = described.model_card
    assert (card.kv_cache_block_size, card.total_kv_blocks, list(card.eos_token_ids)) == (16, 128, [2])


async def test_a_cpu_prefill_worker_serves_kv_bytes(tokenizer: Any) -> None:
    prompt = prompt_of(tokenizer, "Name a planet in our solar system.")
    async with running_worker(MockerConfig(), engine="cpu", cpu=CPU, role="prefill") as w:
        responses = await w.generate(generate_request("pf", prompt, 10))
        transfer = responses[-1].kv_transfer
        fetched = [
            r
            async for r in w.stub.FetchKvBlocks(
                worker_pb2.FetchKvBlocksRequest(transfer_id="pf", release=True), timeout=30
            )
        ]
        assert await w.active_blocks() == 0
    assert len([t for r in responses for t in r.token_ids]) == 1
    assert len(transfer.block_hashes) == len(prompt) // 16
    assert [r.block_hash for r in fetched] == list(transfer.block_hashes)
    layout = fetched[0].layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size) == (30, 3, 64, 16)
    assert all(len(r.data) == 2 * 30 * 16 * 3 * 64 * 4 for r in fetched)
