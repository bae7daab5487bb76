"""KV transfer without a network: where imported blocks enter a decode engine's cache, what the
simulated hand-off costs and where, the checks on transfer parameters, and the fetch client's
stream reassembly and channel pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import pytest

from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.common.errors import InvalidArgument
from tokenyard.common.hashing import block_hashes
from tokenyard.worker.engines.base import (
    EngineInfo,
    EngineRequest,
    EngineRole,
    KvBlockLayout,
    KvTransferParams,
    SamplingParams,
)
from tokenyard.worker.engines.core.block_pool import BlockPool
from tokenyard.worker.engines.core.scheduler import Scheduler, SchedulerConfig
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.engine import MockerEngine
from tokenyard.worker.engines.mocker.executor import MockerExecutor, step_by_hand
from tokenyard.worker.engines.mocker.perf_model import PolynomialPerfModel
from tokenyard.worker.intake import validate
from tokenyard.worker.kv_events import KvEvent, KvStored
from tokenyard.worker.kv_fetch import ChannelPool, FetchFailed, _receive

pytestmark = pytest.mark.unit

BS = 4
PROMPT = tuple(range(100, 130))  # 30 tokens: 7 full blocks of 4 and a partial one
HASHES = tuple(block_hashes(list(PROMPT), BS)[1])


def transfer(hashes: Sequence[int] = HASHES, num_tokens: int = len(PROMPT), **kw: Any) -> KvTransferParams:
    values: dict[str, Any] = {
        "source_worker_id": 1,
        "source_dp_rank": 0,
        "source_address": "127.0.0.1:19001",
        "transfer_id": "t",
        "block_hashes": tuple(hashes),
        "num_tokens": num_tokens,
        **kw,
    }
    return KvTransferParams(**values)


def req(request_id: str, prompt: Iterable[int], **kw: Any) -> EngineRequest:
    return EngineRequest(request_id, tuple(prompt), sampling=SamplingParams(), **kw)


# -- where imported blocks enter the cache ----------------------------------------------------


class Rank:
    def __init__(self, role: EngineRole = EngineRole.DECODE, **overrides: Any) -> None:
        self.config = MockerConfig(block_size=BS, num_gpu_blocks=64, speedup_ratio=0, **overrides)
        self.events: list[Any] = []
        self.pool = BlockPool(64, BS, sink=self.events.append)
        self.scheduler = Scheduler(
            self.pool, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=256)
        )
        self.executor = MockerExecutor(self.config, role=role, perf_model=PolynomialPerfModel())

    def add(self, request: EngineRequest, imported: Iterable[int] | None = None) -> Any:
        seq = self.scheduler.add(request, self.executor.sampler(request))
        if imported is not None:
            seq.imported = dict.fromkeys(imported, b"")
        return seq

    def run(self) -> list[Any]:
        steps = []
        while self.scheduler.has_work:
            steps.append(step_by_hand(self.scheduler, self.executor))
        return steps


def stored(events: Iterable[Any]) -> list[int]:
    return [b.block_hash for e in events if isinstance(e, KvStored) for b in e.blocks]


def test_imported_blocks_enter_the_cache_and_are_announced() -> None:
    r = Rank()
    seq = r.add(req("d", PROMPT, max_tokens=2, kv_transfer=transfer()), HASHES)
    r.run()
    assert seq.usage().cached_tokens == 28  # 7 full blocks: only the partial one was computed here
    assert stored(r.events)[:7] == list(HASHES)
    assert r.pool.cached_hashes() >= set(HASHES)


def test_imported_blocks_continue_the_cached_prefix() -> None:
    r = Rank()
    r.add(req("warm", PROMPT[:13], max_tokens=1))
    r.run()
    assert r.pool.cached_hashes() == set(HASHES[:3])
    r.events.clear()
    # Only the blocks the cache lacks were fetched.
    seq = r.add(req("d", PROMPT, max_tokens=1, kv_transfer=transfer()), HASHES[3:])
    r.run()
    assert seq.usage().cached_tokens == 28
    assert stored(r.events)[:4] == list(HASHES[3:])


def test_imported_blocks_past_a_gap_in_the_cache_are_not_used() -> None:
    # Fetched blocks 3.. while blocks 0..2 were cached, but those were evicted before admission:
    # the prompt is computed from the start (nothing can hang off a missing parent).
    r = Rank()
    seq = r.add(req("d", PROMPT, max_tokens=1, kv_transfer=transfer()), HASHES[3:])
    r.run()
    assert seq.usage().cached_tokens == 0
    assert set(stored(r.events)) >= set(HASHES)


def test_a_decode_mocker_announces_the_transferred_prompt() -> None:
    async def scenario() -> tuple[list[KvEvent], Any]:
        events: list[KvEvent] = []
        config = MockerConfig(block_size=BS, speedup_ratio=0)
        async with MockerEngine(config, role=EngineRole.DECODE) as engine:
            engine.subscribe_kv_events(events.append)
            chunks = [
                c async for c in engine.generate(req("d", PROMPT, max_tokens=3, kv_transfer=transfer()))
            ]
        return events, chunks[-1].usage

    events, usage = asyncio.run(scenario())
    assert stored(e.data for e in events)[:7] == list(HASHES)
    assert (usage.prompt_tokens, usage.cached_tokens) == (30, 30)


# -- the simulated hand-off --------------------------------------------------------------------


def test_the_hand_off_is_charged_to_the_prefill_only_request() -> None:
    # The reference sleeps isl * kv_bytes_per_token / bandwidth before the prefill's one token.
    config = MockerConfig(
        block_size=BS, speedup_ratio=2.0, kv_bytes_per_token=1_000_000, kv_transfer_bandwidth_gbps=10.0
    )
    for role in (EngineRole.PREFILL, EngineRole.AGGREGATED):
        executor = MockerExecutor(config, role=role)
        r = Rank(role)
        pf = r.add(req("p", PROMPT, prefill_only=True))
        plain = r.add(req("a", PROMPT, max_tokens=1))
        assert executor.finish_delay_s(pf) == pytest.approx(30 * 1e6 / 10e9 / 2.0)
        assert executor.finish_delay_s(plain) == 0.0
    decode = MockerExecutor(config, role=EngineRole.DECODE)
    assert decode.finish_delay_s(Rank().add(req("d", PROMPT, kv_transfer=transfer()))) == 0.0
    assert MockerExecutor(config.model_copy(update={"kv_bytes_per_token": 0})).finish_delay_s(pf) == 0.0


def test_a_decode_mocker_charges_prefill_only_for_prompts_it_computes() -> None:
    transferred = Rank()
    transferred.add(req("d", PROMPT, max_tokens=2, kv_transfer=transfer()), HASHES)
    assert all(step.prefill_ms == 0.0 for step in transferred.run())
    # Conditional disaggregation (or a failed fetch) leaves the prompt to the decode worker: it pays.
    local = Rank()
    local.add(req("d", PROMPT, max_tokens=2))
    steps = local.run()
    assert steps[0].prefill_ms == pytest.approx(PolynomialPerfModel().prefill_ms(1, 30, 0))


def test_a_prefill_only_request_costs_no_decode_on_any_role() -> None:
    r = Rank(EngineRole.AGGREGATED)
    r.add(req("p", PROMPT, prefill_only=True))
    steps = r.run()
    assert [s.decode_ms for s in steps] == [0.0]


# -- transfer parameters ------------------------------------------------------------------------

INFO = EngineInfo("cpu", 1, BS, 256, 64, 8, 512, (), True)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (transfer(transfer_id=""), "transfer_id must be set"),
        (transfer(num_tokens=31), "num_tokens is 31, more than the prompt's 30 tokens"),
        (transfer(num_tokens=27), "names 7 blocks, but its 27 tokens make at most 6 complete blocks of 4"),
        (transfer(source_address=""), "source_address must be the prefill worker's host:port"),
        (transfer(source_address="host"), "source_address"),
        (transfer(source_address="host:0"), "source_address"),
        (transfer(source_address="a b:80"), "source_address"),
    ],
)
def test_transfer_parameters_that_cannot_describe_the_prompt_are_refused(
    params: KvTransferParams, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate(req("d", PROMPT, kv_transfer=params), "m", "m", INFO, pulls_kv=True)


def test_good_transfer_parameters_pass() -> None:
    for address in ("127.0.0.1:8300", "worker-3.ns.svc:8300", "[::1]:8300"):
        validate(
            req("d", PROMPT, kv_transfer=transfer(source_address=address)), "m", "m", INFO, pulls_kv=True
        )
    # The prompt may extend the transferred one (the prefill's token appended), and an engine that
    # simulates the transfer needs no source.
    validate(req("d", (*PROMPT, 1, 2), kv_transfer=transfer(source_address="")), "m", "m", INFO)
    with pytest.raises(InvalidArgument, match="exclusive"):
        validate(req("d", PROMPT, kv_transfer=transfer(), prefill_only=True), "m", "m", INFO)


# -- the fetch stream ---------------------------------------------------------------------------

LAYOUT = KvBlockLayout(2, 2, 8, BS, "float32", 42)
LAYOUT_PB = worker_pb2.KvBlockLayout(
    num_layers=2, num_kv_heads=2, head_dim=8, block_size=BS, dtype="float32", layout_hash=42
)


async def stream(
    messages: list[worker_pb2.FetchKvBlocksResponse],
) -> AsyncIterator[worker_pb2.FetchKvBlocksResponse]:
    for message in messages:
        yield message


def receive(messages: list[worker_pb2.FetchKvBlocksResponse], wanted: list[int], size: int = 10) -> Any:
    return asyncio.run(_receive(stream(messages), wanted, LAYOUT, size))


def msg(index: int, block_hash: int, data: bytes, **kw: Any) -> worker_pb2.FetchKvBlocksResponse:
    return worker_pb2.FetchKvBlocksResponse(block_index=index, block_hash=block_hash, data=data, **kw)


def test_blocks_whole_and_in_parts_are_reassembled() -> None:
    messages = [
        msg(0, 11, b"a" * 10, layout=LAYOUT_PB),
        msg(1, 12, b"b" * 4, offset=0, block_bytes=10),
        msg(1, 12, b"c" * 4, offset=4, block_bytes=10),
        msg(1, 12, b"d" * 2, offset=8, block_bytes=10),
        msg(2, 13, b"e" * 10),
    ]
    assert receive(messages, [11, 12, 13]) == [(11, b"a" * 10), (12, b"bbbbccccdd"), (13, b"e" * 10)]


@pytest.mark.parametrize(
    ("messages", "reason", "detail"),
    [
        ([msg(0, 11, b"a" * 10)], "invalid_response", "no layout"),
        (
            [msg(0, 11, b"a" * 10, layout=worker_pb2.KvBlockLayout(num_layers=3))],
            "layout_mismatch",
            "layout",
        ),
        ([msg(0, 12, b"a" * 10, layout=LAYOUT_PB)], "invalid_response", "was due"),
        ([msg(0, 11, b"a" * 9, layout=LAYOUT_PB)], "invalid_response", "has 9 bytes"),
        ([msg(0, 11, b"a" * 10, layout=LAYOUT_PB)], "invalid_response", "after 1 of 2 blocks"),
        (
            [
                msg(0, 11, b"a" * 4, layout=LAYOUT_PB, offset=0, block_bytes=10),
                msg(0, 11, b"a" * 4, offset=5, block_bytes=10),
            ],
            "invalid_response",
            "offset 5",
        ),
        (
            [msg(0, 11, b"a" * 4, layout=LAYOUT_PB, offset=0, block_bytes=1 << 40)],
            "invalid_response",
            "expected 10",
        ),
        (
            [msg(0, 11, b"a" * 10, layout=LAYOUT_PB), msg(1, 12, b"a" * 10), msg(2, 13, b"a" * 10)],
            "invalid_response",
            "more blocks",
        ),
    ],
)
def test_a_stream_that_does_not_fit_the_request_fails(
    messages: list[worker_pb2.FetchKvBlocksResponse], reason: str, detail: str
) -> None:
    with pytest.raises(FetchFailed) as failed:
        receive(messages, [11, 12])
    assert failed.value.reason == reason
    assert detail in failed.value.detail


def test_the_channel_pool_keeps_one_channel_per_source_and_closes_idle_ones_first() -> None:
    async def scenario() -> tuple[int, int, bool]:
        pool = ChannelPool(max_channels=2)
        async with pool.channel("127.0.0.1:19001") as first:
            async with pool.channel("127.0.0.1:19001") as again:
                assert again is first
            async with pool.channel("127.0.0.1:19002"), pool.channel("127.0.0.1:19003"):
                during = len(pool)  # all three in use: none closed under its caller
        after = len(pool)
        await pool.aclose()
        try:
            async with pool.channel("127.0.0.1:19001"):
                pass
        except FetchFailed:
            return during, after, True
        return during, after, False

    assert asyncio.run(scenario()) == (3, 2, True)


def test_a_prefill_mocker_keeps_the_prompt_blocks_while_its_kv_travels() -> None:
    # 30 tokens x 10 MB at 1 GB/s: 300 ms of hand-off after a ~17 ms prefill step; the blocks stay
    # taken until the hand-off is over.
    config = MockerConfig(
        block_size=BS, speedup_ratio=1.0, kv_bytes_per_token=10_000_000, kv_transfer_bandwidth_gbps=1.0
    )

    async def scenario() -> tuple[float, int, list[int], int]:
        async with MockerEngine(config, role=EngineRole.PREFILL) as engine:
            loop = asyncio.get_running_loop()
            started = loop.time()
            task = asyncio.create_task(collect(engine.generate(req("p", PROMPT))))
            await asyncio.sleep(0.2)
            during = engine.load()[0].active_blocks
            tokens = await task
            waited = loop.time() - started
            await asyncio.sleep(0.05)
            return waited, during, tokens, engine.load()[0].active_blocks

    waited, during, tokens, after = asyncio.run(scenario())
    assert tokens == [1] and waited >= 0.3
    assert during == 8  # the prompt's 8 blocks, the token computed long before
    assert after == 0


async def collect(chunks: Any) -> list[int]:
    return [len(c.token_ids) async for c in chunks]
