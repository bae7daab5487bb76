"""Generate over real gRPC against an in-process worker on the mocker: streaming, usage, stops,
validation, cancellation, admission, identity."""

from __future__ import annotations

import grpc
import pytest

from tests.fixtures.worker import MODEL, RunningWorker, eventually, generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.common.hashing import block_hashes
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.executor import pseudo_token, request_seed

pytestmark = pytest.mark.integration

# Context 512 tokens; speedup 0: steps never sleep.
FAST = MockerConfig(speedup_ratio=0, block_size=4, num_gpu_blocks=256, max_model_len=512)
# Real time (a few ms per decode step): requests stay in flight long enough to be cancelled.
REAL_TIME = MockerConfig(speedup_ratio=1, block_size=4, num_gpu_blocks=2048)


def expected_tokens(request_id: str, prompt_len: int, n: int, seed: int | None = None) -> list[int]:
    s = request_seed(request_id, seed)
    return [pseudo_token(s, prompt_len + k, FAST.vocab_size) for k in range(n)]


def tokens_of(responses: list[worker_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def metric(worker: RunningWorker, line_prefix: str) -> float:
    text = worker.server.runtime.metrics.render()[0].decode()
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_streams_max_tokens_then_usage_and_timings() -> None:
    async with running_worker(FAST) as w:
        responses = await w.generate(generate_request("r1", range(40), 30))
    assert tokens_of(responses) == expected_tokens("r1", 40, 30)
    *middle, last = responses
    assert all(r.token_ids and r.finish_reason == worker_pb2.FINISH_REASON_UNSPECIFIED for r in middle)
    assert not any(r.HasField("usage") for r in middle)
    assert last.finish_reason == worker_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) == (40, 30, 0)
    assert 0 < last.timings.first_token_ms <= last.timings.total_ms


async def test_a_repeated_prompt_reports_cached_tokens() -> None:
    prompt = list(range(1000, 1040))
    async with running_worker(FAST) as w:
        first = await w.generate(generate_request("a", prompt, 5))
        second = await w.generate(generate_request("b", prompt, 5))
    assert first[-1].usage.cached_tokens == 0
    cached = second[-1].usage.cached_tokens
    # Whole blocks only, and the last prompt token is always computed.
    assert 0 < cached < len(prompt) and cached % FAST.block_size == 0


async def test_without_max_tokens_generation_stops_at_the_context_length() -> None:
    async with running_worker(FAST) as w:
        responses = await w.generate(generate_request("ctx", range(500)))
    assert len(tokens_of(responses)) == 512 - 500
    assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH


async def test_a_stop_token_ends_the_stream_with_stop() -> None:
    expected = expected_tokens("s", 20, 40, seed=7)
    # The first token that did not occur before it, from the fifth on, is the stop token.
    index = next(i for i in range(4, 40) if expected[i] not in expected[:i])
    request = generate_request("s", range(20), 40, seed=7, stop_token_ids=[expected[index]])
    async with running_worker(FAST) as w:
        responses = await w.generate(request)
    assert tokens_of(responses) == expected[: index + 1]
    assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
    assert responses[-1].usage.completion_tokens == index + 1


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (generate_request("e", []), grpc.StatusCode.INVALID_ARGUMENT, "token_ids must not be empty"),
        (generate_request("z", [1, 2], 0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1"),
        (generate_request("l", range(512), 1), grpc.StatusCode.INVALID_ARGUMENT, "context length of 512"),
        (generate_request("", [1], 1), grpc.StatusCode.INVALID_ARGUMENT, "request_id must be set"),
        (generate_request("m", [1], 1, model="other"), grpc.StatusCode.NOT_FOUND, "'other' is not served"),
        (
            worker_pb2.GenerateRequest(
                request_id="p", model=MODEL, token_ids=[1], sampling=worker_pb2.SamplingParams(top_p=0.0)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.top_p",
        ),
        (
            worker_pb2.GenerateRequest(request_id="d", model=MODEL, token_ids=[1], dp_rank=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dp_rank 3 out of range",
        ),
    ],
)
async def test_bad_requests_are_refused_with_a_clear_status(
    request_: worker_pb2.GenerateRequest, code: grpc.StatusCode, message: str
) -> None:
    async with running_worker(FAST) as w:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.generate(request_)
        assert metric(w, 'tokenyard_worker_requests_total{reason="rejected"}') == 1
    assert err.value.code() == code
    assert message in (err.value.details() or "")


async def test_a_cancelled_call_aborts_the_request_and_frees_its_blocks() -> None:
    async with running_worker(REAL_TIME, load_interval=0.05) as w:
        events = w.stub.SubscribeKvEvents(worker_pb2.SubscribeKvEventsRequest())
        call = w.stub.Generate(generate_request("long", range(100), 5000))
        async for response in call:
            assert response.token_ids
            break
        assert await w.active_blocks() > 0
        call.cancel()

        async def freed() -> bool:
            return await w.active_blocks() == 0

        await eventually(freed, "the cancelled request's blocks are freed")
        # The event stream's load snapshots see it too.
        async for message in events:
            if (
                message.HasField("load")
                and message.load.active_blocks == 0
                and message.load.running_requests == 0
            ):
                break
        events.cancel()

        async def counted() -> bool:
            return metric(w, 'tokenyard_worker_requests_total{reason="disconnected"}') == 1

        await eventually(counted, "the request counted as disconnected")
        assert metric(w, "tokenyard_worker_active_requests") == 0
        # The worker is still healthy: the next request runs normally.
        responses = await w.generate(generate_request("after", range(10), 3))
        assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH


async def test_a_request_id_already_running_is_refused() -> None:
    async with running_worker(REAL_TIME) as w:
        call = w.stub.Generate(generate_request("dup", range(10), 5000))
        async for _ in call:
            break
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.generate(generate_request("dup", range(10), 5))
        call.cancel()
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_the_in_flight_limit_refuses_with_resource_exhausted() -> None:
    async with running_worker(REAL_TIME, max_in_flight=1) as w:
        call = w.stub.Generate(generate_request("one", range(10), 5000))
        async for _ in call:
            break
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.generate(generate_request("two", range(10), 5))
        call.cancel()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_describe_and_discovery_carry_the_model_card() -> None:
    async with running_worker(FAST) as w:
        described = await w.stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
        [instance] = await w.discovery.instances("worker")
        load = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
    card = described.model_card
    assert described.worker_id == instance.instance_id
    assert described.role == worker_pb2.WORKER_ROLE_AGGREGATED
    assert (described.engine, described.dp_size, described.draining) == ("mocker", 1, False)
    assert described.publishes_kv_events
    assert (card.name, card.tokenizer, card.kv_cache_block_size) == (MODEL, "smollm2", 4)
    assert (card.context_length, card.total_kv_blocks, card.max_num_seqs) == (512, 256, FAST.max_num_seqs)
    assert instance.address == w.server.address and instance.role == "aggregated"
    assert instance.model_card is not None
    assert instance.model_card.to_dict() == {
        "model": MODEL,
        "tokenizer": "smollm2",
        "block_size": 4,
        "context_length": 512,
        "total_kv_blocks": 256,
        "engine": "mocker",
        "role": "aggregated",
        "reasoning_parser": "",
        "tool_call_parser": "",
        "structured_output": [],
    }
    assert [(r.dp_rank, r.total_blocks, r.active_blocks) for r in load.ranks] == [(0, 256, 0)]


async def test_a_prefill_worker_returns_transfer_parameters() -> None:
    async with running_worker(FAST, role="prefill") as w:
        responses = await w.generate(generate_request("pf", range(30), 10))
        described = await w.stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in w.stub.FetchKvBlocks(worker_pb2.FetchKvBlocksRequest(transfer_id="pf")):
                pass
    last = responses[-1]
    assert len(tokens_of(responses)) == 1
    assert last.finish_reason == worker_pb2.FINISH_REASON_LENGTH
    transfer = last.kv_transfer
    assert (transfer.source_worker_id, transfer.source_address) == (described.worker_id, w.server.address)
    assert (transfer.transfer_id, transfer.num_tokens) == ("pf", 30)
    assert list(transfer.block_hashes) == block_hashes(list(range(30)), 4)[1]
    assert described.role == worker_pb2.WORKER_ROLE_PREFILL
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "holds no KV bytes" in (err.value.details() or "")


async def test_worker_metrics_count_requests_by_finish_reason_and_blocks() -> None:
    async with running_worker(FAST, load_interval=0.05) as w:
        await w.generate(generate_request("m1", range(12), 4))
        await w.generate(generate_request("m2", range(12), 4))

        async def sampled() -> bool:
            return metric(w, 'tokenyard_worker_kv_blocks_total{dp_rank="0"}') == 256

        await eventually(sampled, "KV block gauges sampled")
        assert metric(w, 'tokenyard_worker_requests_total{reason="length"}') == 2
        assert metric(w, "tokenyard_worker_generated_tokens_total") == 8
        assert metric(w, 'tokenyard_worker_kv_blocks_active{dp_rank="0"}') == 0
        assert metric(w, 'tokenyard_worker_kv_events_published_total{dp_rank="0",kind="stored"}') >= 1
