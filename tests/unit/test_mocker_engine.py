"""The asyncio engine: streaming and coalescing, cancellation, data-parallel ranks, events, load."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tokenyard.worker.engines.mocker.config import EngineRole, MockerConfig
from tokenyard.worker.engines.mocker.engine import EngineError, MockerEngine, StepReport
from tokenyard.worker.engines.mocker.request import (
    FinishReason,
    MockerRequest,
    TokenChunk,
    pseudo_token,
    request_seed,
)
from tokenyard.worker.kv_events import KvCleared, KvEvent, KvStored

pytestmark = pytest.mark.unit

FAST = MockerConfig(speedup_ratio=0)


def expected(request: MockerRequest, n: int, vocab: int = 49152) -> list[int]:
    seed = request_seed(request.request_id, request.seed)
    return [pseudo_token(seed, len(request.token_ids) + k, vocab) for k in range(n)]


async def collect(engine: MockerEngine, request: MockerRequest) -> list[TokenChunk]:
    return [chunk async for chunk in engine.generate(request)]


class Glacial:
    """A perf model whose steps take a day: only an engine that never sleeps can finish."""

    def prefill_ms(self, batch_size: int, mean_isl: float, mean_prefix: float) -> float:
        return 86_400_000.0

    def decode_ms(
        self, batch_size: int, active_kv_tokens: int, mean_context_len: float, total_kv_tokens: int
    ) -> float:
        return 86_400_000.0


async def test_stream_ends_with_usage_and_timings() -> None:
    request = MockerRequest("r", range(300), max_tokens=20)
    async with MockerEngine(FAST) as engine:
        chunks = await collect(engine, request)
        again = await collect(engine, MockerRequest("r2", range(300), max_tokens=1))
    assert [t for c in chunks for t in c.token_ids] == expected(request, 20)
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (300, 20)
    assert last.usage.cached_tokens == 0
    assert last.timings is not None and last.timings.first_token_s is not None
    assert 0 <= last.timings.first_token_s <= last.timings.total_s
    assert again[-1].usage is not None and again[-1].usage.cached_tokens == 256


async def test_speedup_zero_never_sleeps_but_yields_to_the_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with MockerEngine(FAST, perf_model=Glacial()) as engine:
        task = asyncio.create_task(ticker())
        requests = [MockerRequest(f"r{i}", range(i, i + 100), max_tokens=50) for i in range(8)]
        # Each step would take a day at speedup 1; the guard is far below that.
        results = await asyncio.wait_for(asyncio.gather(*(collect(engine, r) for r in requests)), timeout=120)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert all(sum(len(c.token_ids) for c in chunks) == 50 for chunks in results)
    assert ticks >= 50  # the loop ran other tasks between steps


async def test_tokens_ready_since_the_last_read_come_in_one_chunk() -> None:
    request = MockerRequest("r", range(64), max_tokens=40)
    async with MockerEngine(FAST) as engine:
        done = asyncio.Event()
        # Step listeners run after the step's tokens were handed out.
        engine.subscribe_steps(lambda report: done.set() if not engine.load()[0].running else None)
        stream = engine.generate(request)
        first = await anext(stream)
        await done.wait()  # the engine finishes while nobody reads
        rest = [chunk async for chunk in stream]
    assert len(rest) == 1
    assert rest[0].finish_reason is FinishReason.LENGTH
    assert list(first.token_ids) + list(rest[0].token_ids) == expected(request, 40)


async def test_real_time_mode_produces_the_same_tokens() -> None:
    request = MockerRequest("r", range(100), max_tokens=5, seed=11)
    async with MockerEngine(MockerConfig(speedup_ratio=50.0)) as engine:
        chunks = await collect(engine, request)
    assert [t for c in chunks for t in c.token_ids] == expected(request, 5)


async def test_leaving_the_stream_aborts_and_frees_blocks() -> None:
    async with MockerEngine(FAST) as engine:
        stream = engine.generate(MockerRequest("r", range(1000), max_tokens=10_000))
        async with contextlib.aclosing(stream):
            await anext(stream)
            assert engine.load()[0].active_blocks > 0
        load = engine.load()[0]
        assert (load.active_blocks, load.running, load.waiting) == (0, 0, 0)


async def test_cancelling_the_consumer_task_frees_blocks() -> None:
    async with MockerEngine(FAST) as engine:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(MockerRequest("r", range(500), max_tokens=10_000)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert engine.load()[0].active_blocks == 0
        assert engine.load()[0].running == 0


async def test_abort_ends_the_stream_with_cancelled() -> None:
    async with MockerEngine(FAST) as engine:
        stream = engine.generate(MockerRequest("r", range(500), max_tokens=10_000))
        await anext(stream)
        assert engine.abort("r")
        assert not engine.abort("r")
        rest = [chunk async for chunk in stream]
        assert rest[-1].finish_reason is FinishReason.CANCELLED
        usage = rest[-1].usage
        assert usage is not None and usage.prompt_tokens == 500 and usage.completion_tokens >= 1
        assert engine.load()[0].active_blocks == 0


async def test_requests_are_checked_before_they_run() -> None:
    engine = MockerEngine(MockerConfig(speedup_ratio=0, max_model_len=100))
    with pytest.raises(EngineError, match="not running"):
        await anext(engine.generate(MockerRequest("r", [1], max_tokens=1)))
    async with engine:
        with pytest.raises(ValueError, match="no room"):
            await anext(engine.generate(MockerRequest("r", range(100), max_tokens=1)))
        with pytest.raises(ValueError, match="dp_rank"):
            await anext(engine.generate(MockerRequest("r", [1], max_tokens=1, dp_rank=1)))
        first = engine.generate(MockerRequest("dup", [1, 2], max_tokens=1000))
        await anext(first)
        with pytest.raises(ValueError, match="already"):
            await anext(engine.generate(MockerRequest("dup", [1, 2], max_tokens=1)))
        await first.aclose()


async def test_stop_cancels_requests_in_flight() -> None:
    engine = MockerEngine(FAST)
    await engine.start()
    stream = engine.generate(MockerRequest("r", range(50), max_tokens=100_000))
    await anext(stream)
    await engine.stop()
    rest = [chunk async for chunk in stream]
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    assert engine.load()[0].active_blocks == 0


async def test_events_only_for_new_blocks_with_consecutive_ids() -> None:
    events: list[KvEvent] = []
    async with MockerEngine(FAST) as engine:
        engine.subscribe_kv_events(events.append)
        await collect(engine, MockerRequest("a", range(200), max_tokens=1))
        assert [e.event_id for e in events] == [0]
        assert isinstance(events[0].data, KvStored) and len(events[0].data.blocks) == 3
        await collect(engine, MockerRequest("b", range(200), max_tokens=1))
        assert len(events) == 1  # the same prompt again: every full block is a cache hit
        await collect(engine, MockerRequest("c", [*range(128), *range(900, 972)], max_tokens=1))
        assert len(events) == 2
        stored = events[1].data
        assert isinstance(stored, KvStored) and stored.start_position == 2 and len(stored.blocks) == 1
        engine.reset_prefix_cache()
        assert events[-1] == KvEvent(2, 0, KvCleared())
        assert engine.kv_snapshot().events == ()
        assert engine.kv_snapshot().last_event_id == 2


async def test_events_iterator_and_snapshot() -> None:
    async with MockerEngine(FAST) as engine:
        received: list[KvEvent] = []

        async def listen() -> None:
            async for event in engine.kv_events():
                received.append(event)
                if len(received) == 2:
                    return

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0)
        await collect(engine, MockerRequest("a", range(128), max_tokens=1))
        await collect(engine, MockerRequest("b", range(500, 628), max_tokens=1))
        await asyncio.wait_for(listener, timeout=30)
        assert [e.event_id for e in received] == [0, 1]
        snapshot = engine.kv_snapshot(0)
        assert snapshot.last_event_id == 1
        assert {b.block_hash for e in snapshot.events for b in e.blocks} == {
            b.block_hash for e in received if isinstance(e.data, KvStored) for b in e.data.blocks
        }


async def test_decode_role_publishes_no_events() -> None:
    events: list[KvEvent] = []
    async with MockerEngine(FAST, role=EngineRole.DECODE) as engine:
        assert not engine.publishes_kv_events
        engine.subscribe_kv_events(events.append)
        chunks = await collect(engine, MockerRequest("d", range(300), max_tokens=3))
        assert sum(len(c.token_ids) for c in chunks) == 3
        assert engine.kv_snapshot().events == ()
    assert events == []


async def test_prefill_role_returns_one_token() -> None:
    async with MockerEngine(FAST, role=EngineRole.PREFILL) as engine:
        chunks = await collect(engine, MockerRequest("p", range(300), max_tokens=100))
    assert [len(c.token_ids) for c in chunks] == [1]
    assert chunks[-1].finish_reason is FinishReason.LENGTH


async def test_data_parallel_ranks_balance_and_number_events_separately() -> None:
    events: list[KvEvent] = []
    async with MockerEngine(MockerConfig(speedup_ratio=0, dp_size=2)) as engine:
        engine.subscribe_kv_events(events.append)
        a = engine.generate(MockerRequest("a", range(100), max_tokens=1000))
        b = engine.generate(MockerRequest("b", range(100), max_tokens=1000))
        first_a, first_b = await anext(a), await anext(b)
        assert {first_a.dp_rank, first_b.dp_rank} == {0, 1}
        loads = engine.load()
        assert [load.running for load in loads] == [1, 1]
        assert all(load.total_blocks == 16384 for load in loads)
        await a.aclose()
        await b.aclose()
        pinned = await collect(engine, MockerRequest("c", range(100), max_tokens=1, dp_rank=1))
        assert pinned[-1].dp_rank == 1
    assert sorted((e.dp_rank, e.event_id) for e in events) == [(0, 0), (1, 0)]


async def test_load_counts_waiting_and_prefill_tokens() -> None:
    config = MockerConfig(speedup_ratio=0, max_num_seqs=1)
    async with MockerEngine(config, perf_model=Glacial()) as engine:
        reports: list[StepReport] = []
        engine.subscribe_steps(reports.append)
        a = engine.generate(MockerRequest("a", range(100), max_tokens=1000))
        b = engine.generate(MockerRequest("b", range(1000, 1300), max_tokens=1))
        await anext(a)
        b_task = asyncio.create_task(anext(b))
        await asyncio.sleep(0)
        load = engine.load()[0]
        assert (load.running, load.waiting) == (1, 1)
        assert load.active_prefill_tokens == 300
        await a.aclose()
        chunk = await b_task
        assert chunk.finish_reason is FinishReason.LENGTH
        await b.aclose()
    assert reports and reports[0].duration_s == 0.0
    assert reports[0].result.num_prefill_requests == 1
