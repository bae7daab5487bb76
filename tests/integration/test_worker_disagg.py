"""Disaggregated prefill and decode between in-process workers over real gRPC on loopback.

The engine is the mocker's executor with KV bytes added (:class:`BytesMocker`): every block a step
computes gets bytes derived from the tokens of its whole prefix, and every step checks that the
blocks a request attends to hold exactly those bytes. So a decode worker that imports a prompt
proves the bytes it got are the prefill worker's, without a model and in milliseconds. The CPU
engine with the real model runs the same flow in ``test_cpu_disagg.py``.

Failure paths use stand-in sources (a gRPC server that hangs, or streams nonsense) where a real
prefill worker would not misbehave on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
import xxhash

from tests.fixtures.worker import MODEL, eventually, generate_request
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.hashing import block_hashes
from tokenyard.worker import servicer as servicer_module
from tokenyard.worker.config import WorkerSettings
from tokenyard.worker.engines.base import EngineRole, KvBlockLayout
from tokenyard.worker.engines.core.block_pool import Block
from tokenyard.worker.engines.core.engine import KvTransferEngine
from tokenyard.worker.engines.core.scheduler import Scheduled, SequenceState
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.executor import MockerExecutor, pseudo_token, request_seed
from tokenyard.worker.server import WorkerServer

pytestmark = pytest.mark.integration

BS = 4
FAST = MockerConfig(speedup_ratio=0, block_size=BS, num_gpu_blocks=256, max_model_len=512)
BLOCK_BYTES = 64 * 1024


def block_content(tokens: Sequence[int], size: int = BLOCK_BYTES) -> bytes:
    """What the KV of the last block of ``tokens`` (a whole prefix) holds in a BytesMocker."""
    digest = xxhash.xxh3_128_digest(array("I", tokens).tobytes())
    return digest * (size // len(digest))


class BytesMocker(MockerExecutor):
    """The mocker's step executor with KV bytes, checked at every step."""

    def __init__(self, config: MockerConfig, *, role: EngineRole, layout_tag: str = "bytes-mocker") -> None:
        super().__init__(config, role=role)
        self.store: dict[int, bytes] = {}
        self.layout = KvBlockLayout(
            2, 2, 8, config.block_size, "bytes", xxhash.xxh3_64_intdigest(layout_tag.encode())
        )

    def block_bytes(self) -> int:
        return BLOCK_BYTES

    def kv_layout(self) -> KvBlockLayout:
        return self.layout

    def read_block(self, dp_rank: int, block: Block) -> bytes:
        return self.store[block.block_id]

    def write_block(self, dp_rank: int, block: Block, data: bytes) -> None:
        self.store[block.block_id] = data

    async def execute(self, dp_rank: int, plan: Sequence[Scheduled]) -> dict[SequenceState, int]:
        bs = self.config.block_size
        for work in plan:
            seq = work.seq
            for i in range(work.start // bs):  # the context this step attends to
                held = self.store.get(seq.table.blocks[i].block_id)
                if held != block_content(seq.tokens[: (i + 1) * bs]):
                    raise AssertionError(f"{seq.request_id}: block {i} does not hold its prefix's KV")
            for i in range(work.start // bs, (work.start + work.length) // bs):
                self.store[seq.table.blocks[i].block_id] = block_content(seq.tokens[: (i + 1) * bs])
        return await super().execute(dp_rank, plan)


@dataclass
class Worker:
    server: WorkerServer
    stub: worker_pb2_grpc.WorkerServiceAsyncStub

    @property
    def address(self) -> str:
        return self.server.address

    async def generate(self, request: worker_pb2.GenerateRequest) -> list[worker_pb2.GenerateResponse]:
        return [r async for r in self.stub.Generate(request, timeout=30)]

    def metric(self, name: str) -> float:
        text = self.server.runtime.metrics.render()[0].decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def active_blocks(self) -> int:
        load = await self.stub.GetLoad(worker_pb2.GetLoadRequest(dp_rank=0), timeout=10)
        return int(load.ranks[0].active_blocks)


@contextlib.asynccontextmanager
async def bytes_worker(
    role: str, *, layout_tag: str = "bytes-mocker", hold_s: float = 60.0, **overrides: Any
) -> AsyncIterator[Worker]:
    executor = BytesMocker(FAST, role=EngineRole(role), layout_tag=layout_tag)
    core = replace(FAST.core_config(), kv_transfer_hold_s=hold_s)
    engine = KvTransferEngine("mocker", executor, core, role=EngineRole(role))
    settings = WorkerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        discovery=f"memory://disagg-{uuid.uuid4().hex}",
        grace_period=2.0,
        model=MODEL,
        mocker=FAST,
        role=EngineRole(role),
        load_interval=0.05,
        **overrides,
    )
    async with (
        WorkerServer(settings, engine=engine) as server,
        grpc.aio.insecure_channel(server.address) as ch,
    ):
        yield Worker(server, worker_pb2_grpc.WorkerServiceStub(ch))


def expected(request_id: str, prompt_len: int, n: int) -> list[int]:
    seed = request_seed(request_id, None)
    return [pseudo_token(seed, prompt_len + k, FAST.vocab_size) for k in range(n)]


def tokens_of(responses: list[worker_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def prefill_request(request_id: str, prompt: Sequence[int]) -> worker_pb2.GenerateRequest:
    request = generate_request(request_id, prompt, 8)
    request.disaggregation.prefill_only = True
    return request


def decode_request(
    request_id: str, prompt: Sequence[int], transfer: worker_pb2.KvTransferParams, max_tokens: int = 8
) -> worker_pb2.GenerateRequest:
    request = generate_request(request_id, prompt, max_tokens)
    request.disaggregation.kv_transfer.CopyFrom(transfer)
    return request


async def prefill(worker: Worker, request_id: str, prompt: Sequence[int]) -> worker_pb2.KvTransferParams:
    responses = await worker.generate(prefill_request(request_id, prompt))
    assert len(tokens_of(responses)) == 1
    transfer = responses[-1].kv_transfer
    assert transfer.transfer_id and transfer.source_address == worker.address
    return transfer


PROMPT = list(range(100, 150))  # 50 tokens: 12 full blocks of 4 and a partial one


# -- the happy path -------------------------------------------------------------------------


async def test_a_decode_worker_pulls_the_prompt_kv_and_continues(monkeypatch: pytest.MonkeyPatch) -> None:
    # Blocks travel in 16 KiB parts (4 per block), as a block larger than the part size would.
    monkeypatch.setattr(servicer_module, "KV_PART_BYTES", 16 * 1024)
    async with bytes_worker("prefill") as p, bytes_worker("decode") as d:
        events = asyncio.create_task(stored_hashes(d, 12))
        transfer = await prefill(p, "r1", PROMPT)
        assert list(transfer.block_hashes) == block_hashes(PROMPT, BS)[1]
        assert transfer.num_tokens == 50
        responses = await d.generate(decode_request("r1", PROMPT, transfer))

        assert tokens_of(responses) == expected("r1", 50, 8)
        usage = responses[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (50, 8, 48)
        # The decode worker announces the imported blocks to routers.
        assert set(transfer.block_hashes) <= await asyncio.wait_for(events, 10)
        # The complete fetch released the prefill worker's copy.
        assert await p.active_blocks() == 0
        assert d.metric('tokenyard_worker_kv_transfer_bytes_total{direction="received"}') == 12 * BLOCK_BYTES
        assert d.metric('tokenyard_worker_kv_transfer_blocks_total{direction="received"}') == 12
        assert d.metric('tokenyard_worker_kv_transfer_seconds_count{direction="received"}') == 1
        assert p.metric('tokenyard_worker_kv_transfer_bytes_total{direction="sent"}') == 12 * BLOCK_BYTES
        assert (
            sum(d.metric(f'tokenyard_worker_kv_transfer_fallbacks_total{{reason="{r}"}}') for r in REASONS)
            == 0
        )

        async def released() -> bool:
            return p.metric("tokenyard_worker_kv_transfers_held") == 0

        await eventually(released, "held transfers gauge back to 0")


REASONS = (
    "unreachable",
    "not_found",
    "timeout",
    "layout_mismatch",
    "invalid_response",
    "unsupported",
    "error",
)


async def stored_hashes(worker: Worker, count: int) -> set[int]:
    """Block hashes of ``stored`` events on the worker's KV stream, once ``count`` were seen."""
    seen: set[int] = set()
    call: Any = worker.stub.SubscribeKvEvents(worker_pb2.SubscribeKvEventsRequest(dp_rank=0))
    try:
        async for message in call:
            if message.WhichOneof("payload") == "events":
                for event in message.events.events:
                    if event.WhichOneof("data") == "stored":
                        seen.update(b.block_hash for b in event.stored.blocks)
            if len(seen) >= count:
                return seen
    finally:
        call.cancel()
    return seen


async def test_only_blocks_the_decode_worker_lacks_travel() -> None:
    async with bytes_worker("prefill") as p, bytes_worker("decode") as d:
        # The decode worker computed the first 32 tokens of the prompt itself before.
        await d.generate(generate_request("warm", PROMPT[:33], 1))
        transfer = await prefill(p, "r2", PROMPT)
        responses = await d.generate(decode_request("r2", PROMPT, transfer))
        assert tokens_of(responses) == expected("r2", 50, 8)
        assert responses[-1].usage.cached_tokens == 48
        assert d.metric('tokenyard_worker_kv_transfer_blocks_total{direction="received"}') == 12 - 8
        assert await p.active_blocks() == 0

        # Everything cached already: only the last block travels, which releases the transfer.
        transfer = await prefill(p, "r3", PROMPT)
        responses = await d.generate(decode_request("r3", PROMPT, transfer))
        assert tokens_of(responses) == expected("r3", 50, 8)
        assert d.metric('tokenyard_worker_kv_transfer_blocks_total{direction="received"}') == 4 + 1
        assert await p.active_blocks() == 0


async def test_a_decode_prompt_may_extend_the_transferred_one() -> None:
    # The prefill's token appended (the caller continues from it): the transfer covers a prefix.
    async with bytes_worker("prefill") as p, bytes_worker("decode") as d:
        responses = await p.generate(prefill_request("r4", PROMPT))
        first = tokens_of(responses)
        transfer = responses[-1].kv_transfer
        responses = await d.generate(decode_request("r4", PROMPT + first, transfer, max_tokens=7))
        assert first + tokens_of(responses) == expected("r4", 50, 8)
        assert responses[-1].usage.cached_tokens == 48


# -- failures: the request completes by computing the prompt here ----------------------------


async def test_a_prefill_worker_gone_before_the_fetch_means_local_prefill() -> None:
    async with bytes_worker("decode") as d:
        async with bytes_worker("prefill") as p:
            transfer = await prefill(p, "r5", PROMPT)
        responses = await d.generate(decode_request("r5", PROMPT, transfer))
        assert tokens_of(responses) == expected("r5", 50, 8)
        assert responses[-1].usage.cached_tokens == 0
        assert d.metric('tokenyard_worker_kv_transfer_fallbacks_total{reason="unreachable"}') == 1


async def test_an_expired_transfer_is_not_found_and_the_decode_worker_computes_it() -> None:
    async with bytes_worker("prefill", hold_s=0.2) as p, bytes_worker("decode") as d:
        transfer = await prefill(p, "r6", PROMPT)
        assert await p.active_blocks() > 0

        # Never fetched: the hold timeout frees the blocks.
        async def freed() -> bool:
            return (
                await p.active_blocks() == 0 and p.metric("tokenyard_worker_kv_transfers_expired_total") == 1
            )

        await eventually(freed, "the unfetched transfer dropped after its hold timeout")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in p.stub.FetchKvBlocks(worker_pb2.FetchKvBlocksRequest(transfer_id="r6"), timeout=5):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'r6'" in (err.value.details() or "")

        responses = await d.generate(decode_request("r6", PROMPT, transfer))
        assert tokens_of(responses) == expected("r6", 50, 8)
        assert d.metric('tokenyard_worker_kv_transfer_fallbacks_total{reason="not_found"}') == 1


async def test_a_layout_mismatch_means_local_prefill() -> None:
    async with bytes_worker("prefill") as p, bytes_worker("decode", layout_tag="another-layout") as d:
        transfer = await prefill(p, "r7", PROMPT)
        responses = await d.generate(decode_request("r7", PROMPT, transfer))
        assert tokens_of(responses) == expected("r7", 50, 8)
        assert responses[-1].usage.cached_tokens == 0
        assert d.metric('tokenyard_worker_kv_transfer_fallbacks_total{reason="layout_mismatch"}') == 1


async def test_a_source_without_kv_bytes_means_local_prefill() -> None:
    async with bytes_worker("decode") as d, fake_source("unimplemented") as source:
        transfer = fake_transfer(source.address)
        responses = await d.generate(decode_request("r8", PROMPT, transfer))
        assert tokens_of(responses) == expected("r8", 50, 8)
        assert d.metric('tokenyard_worker_kv_transfer_fallbacks_total{reason="unsupported"}') == 1


@pytest.mark.parametrize("behaviour", ["wrong_hash", "short_block", "too_few", "bad_parts"])
async def test_a_broken_stream_means_local_prefill(behaviour: str) -> None:
    async with bytes_worker("decode") as d, fake_source(behaviour) as source:
        responses = await d.generate(decode_request("r9", PROMPT, fake_transfer(source.address)))
        assert tokens_of(responses) == expected("r9", 50, 8)
        assert d.metric('tokenyard_worker_kv_transfer_fallbacks_total{reason="invalid_response"}') == 1


async def test_a_fetch_past_its_deadline_means_local_prefill() -> None:
    async with bytes_worker("decode", kv_fetch_timeout=0.3) as d, fake_source("hang") as source:
        responses = await d.generate(decode_request("r10", PROMPT, fake_transfer(source.address)))
        assert tokens_of(responses) == expected("r10", 50, 8)
        assert d.metric('tokenyard_worker_kv_transfer_fallbacks_total{reason="timeout"}') == 1
        await asyncio.wait_for(source.servicer.cancelled.wait(), 5)


async def test_cancelling_the_decode_request_aborts_its_fetch() -> None:
    async with bytes_worker("decode") as d, fake_source("hang") as source:
        call: Any = d.stub.Generate(decode_request("r11", PROMPT, fake_transfer(source.address)))
        await asyncio.wait_for(source.servicer.started.wait(), 5)
        call.cancel()
        await asyncio.wait_for(source.servicer.cancelled.wait(), 5)

        async def ended() -> bool:
            return d.server.intake.in_flight == 0

        await eventually(ended, "the cancelled request no longer in flight")
        assert (
            sum(d.metric(f'tokenyard_worker_kv_transfer_fallbacks_total{{reason="{r}"}}') for r in REASONS)
            == 0
        )
        assert d.metric('tokenyard_worker_requests_total{reason="disconnected"}') == 1


async def test_the_channel_to_a_source_is_reused() -> None:
    async with bytes_worker("prefill") as p, bytes_worker("decode") as d:
        for i in range(3):
            transfer = await prefill(p, f"c{i}", PROMPT)
            await d.generate(decode_request(f"c{i}", PROMPT, transfer))
        intake: Any = d.server.intake
        assert len(intake._fetcher.channels) == 1


# -- bad parameters: clear errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"transfer_id": ""}, "transfer_id must be set"),
        ({"num_tokens": 51}, "more than the prompt's 50 tokens"),
        ({"block_hashes": list(range(13))}, "names 13 blocks, but its 50 tokens make at most 12"),
        ({"source_address": "nowhere"}, "source_address must be the prefill worker's host:port"),
        ({"source_address": "127.0.0.1:99999"}, "source_address"),
        ({"prefill_only": True}, "are exclusive"),
    ],
)
async def test_garbage_transfer_parameters_are_invalid_arguments(
    change: dict[str, Any], message: str
) -> None:
    async with bytes_worker("decode") as d:
        transfer = fake_transfer("127.0.0.1:1")
        prefill_only = change.pop("prefill_only", False)
        for field, value in change.items():
            if field == "block_hashes":
                del transfer.block_hashes[:]
                transfer.block_hashes.extend(value)
            else:
                setattr(transfer, field, value)
        request = decode_request("bad", PROMPT, transfer)
        request.disaggregation.prefill_only = prefill_only
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await d.generate(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.value.details() or "")


async def test_fetching_from_a_mocker_is_unimplemented_and_unknown_ids_not_found() -> None:
    async with bytes_worker("prefill") as p:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in p.stub.FetchKvBlocks(
                worker_pb2.FetchKvBlocksRequest(transfer_id="nope"), timeout=5
            ):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in (err.value.details() or "")


# -- stand-in sources -----------------------------------------------------------------------


def fake_transfer(address: str) -> worker_pb2.KvTransferParams:
    return worker_pb2.KvTransferParams(
        source_worker_id=7,
        source_address=address,
        transfer_id="fake",
        block_hashes=block_hashes(PROMPT, BS)[1],
        num_tokens=len(PROMPT),
    )


class FakeSource(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.layout = worker_pb2.KvBlockLayout(
            num_layers=2,
            num_kv_heads=2,
            head_dim=8,
            block_size=BS,
            dtype="bytes",
            layout_hash=xxhash.xxh3_64_intdigest(b"bytes-mocker"),
        )

    async def FetchKvBlocks(
        self, request: worker_pb2.FetchKvBlocksRequest, context: Any
    ) -> AsyncIterator[worker_pb2.FetchKvBlocksResponse]:
        self.started.set()
        wanted = list(request.block_hashes)
        data = bytes(BLOCK_BYTES)
        match self.behaviour:
            case "hang":
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
            case "unimplemented":
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no KV bytes here")
            case "wrong_hash":
                yield worker_pb2.FetchKvBlocksResponse(
                    block_index=0, block_hash=wanted[0] ^ 1, data=data, layout=self.layout
                )
            case "short_block":
                yield worker_pb2.FetchKvBlocksResponse(
                    block_index=0, block_hash=wanted[0], data=data[:-1], layout=self.layout
                )
            case "too_few":
                yield worker_pb2.FetchKvBlocksResponse(
                    block_index=0, block_hash=wanted[0], data=data, layout=self.layout
                )
            case "bad_parts":
                yield worker_pb2.FetchKvBlocksResponse(
                    block_index=0,
                    block_hash=wanted[0],
                    data=data[:100],
                    layout=self.layout,
                    offset=0,
                    block_bytes=BLOCK_BYTES,
                )
                yield worker_pb2.FetchKvBlocksResponse(
                    block_index=0,
                    block_hash=wanted[0],
                    data=data[200:300],
                    offset=200,
                    block_bytes=BLOCK_BYTES,
                )


@dataclass
class RunningSource:
    address: str
    servicer: FakeSource


@contextlib.asynccontextmanager
async def fake_source(behaviour: str) -> AsyncIterator[RunningSource]:
    server = grpc.aio.server()
    servicer = FakeSource(behaviour)  # type: ignore[abstract]  # serves only FetchKvBlocks
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield RunningSource(f"127.0.0.1:{port}", servicer)
    finally:
        await server.stop(None)
