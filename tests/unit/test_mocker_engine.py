"""The simulated engine on the batching core: streaming and coalescing, cancellation, checks,
data-parallel ranks, events and snapshots, roles, load."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from tokenyard.common.errors import AlreadyExists, InvalidArgument, Unavailable
from tokenyard.common.hashing import block_hashes
from tokenyard.worker.engines.base import (
    EngineRequest,
    FinishReason,
    GenerateChunk,
    SamplingParams,
    StepMetrics,
)
from tokenyard.worker.engines.core.engine import BatchingEngine
from tokenyard.worker.engines.mocker.config import EngineRole, MockerConfig
from tokenyard.worker.engines.mocker.engine import MockerEngine
from tokenyard.worker.engines.mocker.executor import pseudo_token, request_seed
from tokenyard.worker.kv_events import KvCleared, KvEvent, KvStored

pytestmark = pytest.mark.unit

FAST = MockerConfig(speedup_ratio=0)


def req(request_id: str, prompt: Iterable[int], *, seed: int | None = None, **kw: Any) -> EngineRequest:
    return EngineRequest(request_id, tuple(prompt), sampling=SamplingParams(seed=seed), **kw)


def expected(request: EngineRequest, n: int, vocab: int = 49152) -> list[int]:
    seed = request_seed(request.request_id, request.sampling.seed)
    return [pseudo_token(seed, len(request.token_ids) + k, vocab) for k in range(n)]


async def collect(engine: BatchingEngine, request: EngineRequest) -> list[GenerateChunk]:
    return [chunk async for chunk in engine.generate(request)]


def active_blocks(engine: BatchingEngine) -> list[int]:
    return [rank.pool.num_active_blocks for rank in engine.ranks]


async def eventually(condition: Callable[[], bool], turns: int = 100) -> bool:
    """Whether ``condition`` holds within ``turns`` turns of the event loop.

    Blocks of a request aborted while its step is in flight go back when that step ends (the
    forward pass may still be writing them), so freeing them can take the step loop one turn."""
    for _ in range(turns):
        if condition():
            return True
        await asyncio.sleep(0)
    return condition()


class Glacial:
    """A perf model whose steps take a day: only an engine that never sleeps can finish."""

    def prefill_ms(self, batch_size: int, mean_isl: float, mean_prefix: float) -> float:
        return 86_400_000.0

    def decode_ms(
        self, batch_size: int, active_kv_tokens: int, mean_context_len: float, total_kv_tokens: int
    ) -> float:
        return 86_400_000.0


async def test_stream_ends_with_usage() -> None:
    request = req("r", range(300), max_tokens=20)
    async with MockerEngine(FAST) as engine:
        chunks = await collect(engine, request)
        again = await collect(engine, req("r2", range(300), max_tokens=1))
    assert [t for c in chunks for t in c.token_ids] == expected(request, 20)
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (300, 20)
    assert last.usage.cached_tokens == 0
    # Changed: chunks carry no timings any more; the last one says how long the request queued.
    assert last.queued_s is not None and last.queued_s >= 0
    assert last.kv_transfer is None
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
        requests = [req(f"r{i}", range(i, i + 100), max_tokens=3000) for i in range(8)]
        # Each step would take a day at speedup 1; the guard is far below that.
        results = await asyncio.wait_for(asyncio.gather(*(collect(engine, r) for r in requests)), timeout=120)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert all(sum(len(c.token_ids) for c in chunks) == 3000 for chunks in results)
    # Steps go back to back for a slice at a time, then the loop runs other tasks: 3000 steps of
    # 8 requests take many slices.
    assert ticks >= 10
    # ... and each request's stream wakes once per slice, not once per step.
    assert all(len(chunks) < 3000 / 4 for chunks in results)


async def test_tokens_ready_since_the_last_read_come_in_one_chunk() -> None:
    # Long enough that the first read comes before the end (steps run a slice at a time).
    request = req("r", range(64), max_tokens=20_000)
    async with MockerEngine(FAST) as engine:
        done = asyncio.Event()
        # Step listeners run after the step's tokens were handed out.
        engine.subscribe_steps(lambda _: done.set() if not engine.load()[0].running else None)
        stream = engine.generate(request)
        first = await anext(stream)
        await done.wait()  # the engine finishes while nobody reads
        rest = [chunk async for chunk in stream]
    assert len(rest) == 1
    assert rest[0].finish_reason is FinishReason.LENGTH
    assert first.finish_reason is None
    assert list(first.token_ids) + list(rest[0].token_ids) == expected(request, 20_000)


async def test_real_time_mode_produces_the_same_tokens() -> None:
    request = req("r", range(100), max_tokens=5, seed=11)
    async with MockerEngine(MockerConfig(speedup_ratio=50.0)) as engine:
        chunks = await collect(engine, request)
    assert [t for c in chunks for t in c.token_ids] == expected(request, 5)


class Steady:
    """Every step that prefills takes 40 ms, every decode-only step 5 ms."""

    def prefill_ms(self, batch_size: int, mean_isl: float, mean_prefix: float) -> float:
        return 40.0

    def decode_ms(
        self, batch_size: int, active_kv_tokens: int, mean_context_len: float, total_kv_tokens: int
    ) -> float:
        return 0.0


async def test_a_request_after_a_short_idle_spell_takes_its_whole_step() -> None:
    # The deadlines of a busy rank are chained (a late wake-up does not add up); once it has run
    # out of work, the next step starts when it is planned, not where the last one ended.
    async with MockerEngine(MockerConfig(speedup_ratio=1.0), perf_model=Steady()) as engine:
        await collect(engine, req("a", range(64), max_tokens=1))
        await asyncio.sleep(0.03)
        started = asyncio.get_running_loop().time()
        await collect(engine, req("b", range(1000, 1064), max_tokens=1))
        assert asyncio.get_running_loop().time() - started >= 0.039


async def test_leaving_the_stream_aborts_and_frees_blocks() -> None:
    async with MockerEngine(FAST) as engine:
        stream = engine.generate(req("r", range(1000), max_tokens=10_000))
        async with contextlib.aclosing(stream):
            await anext(stream)
            assert active_blocks(engine)[0] > 0
        load = engine.load()[0]
        assert (load.running, load.waiting) == (0, 0)
        # Changed: the blocks go back when the step in flight ends, not at once (see eventually).
        assert await eventually(lambda: active_blocks(engine) == [0])
        assert engine.load()[0].active_blocks == 0


async def test_cancelling_the_consumer_task_frees_blocks() -> None:
    async with MockerEngine(FAST) as engine:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(req("r", range(500), max_tokens=10_000)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert engine.load()[0].running == 0
        assert await eventually(lambda: active_blocks(engine) == [0])


async def test_abort_ends_the_stream_with_cancelled() -> None:
    async with MockerEngine(FAST) as engine:
        stream = engine.generate(req("r", range(500), max_tokens=10_000))
        await anext(stream)
        assert engine.abort("r")
        assert not engine.abort("r")
        rest = [chunk async for chunk in stream]
        assert rest[-1].finish_reason is FinishReason.CANCELLED
        usage = rest[-1].usage
        assert usage is not None and usage.prompt_tokens == 500 and usage.completion_tokens >= 1
        assert await eventually(lambda: active_blocks(engine) == [0])
        assert not engine.abort("unknown")


async def test_requests_are_checked_before_they_run() -> None:
    engine = MockerEngine(MockerConfig(speedup_ratio=0, max_model_len=100))
    with pytest.raises(Unavailable, match="not running"):
        await anext(engine.generate(req("r", [1], max_tokens=1)))
    with pytest.raises(Unavailable, match="not started"):
        engine.info()
    async with engine:
        with pytest.raises(InvalidArgument, match="no room"):
            await anext(engine.generate(req("r", range(100), max_tokens=1)))
        with pytest.raises(InvalidArgument, match="dp_rank"):
            await anext(engine.generate(req("r", [1], max_tokens=1, dp_rank=1)))
        with pytest.raises(InvalidArgument, match="at least one token"):
            await anext(engine.generate(req("r", [], max_tokens=1)))
        with pytest.raises(InvalidArgument, match="max_tokens"):
            await anext(engine.generate(req("r", [1], max_tokens=0)))
        assert engine.info().context_length == 100
    # A request long enough to be still running after its first read (a slice of steps).
    async with MockerEngine(FAST) as engine:
        first = engine.generate(req("dup", [1, 2], max_tokens=100_000))
        await anext(first)
        with pytest.raises(AlreadyExists, match="already"):
            await anext(engine.generate(req("dup", [1, 2], max_tokens=1)))
        await first.aclose()
        assert not engine.load()[0].running


async def test_stop_cancels_requests_in_flight() -> None:
    engine = MockerEngine(FAST)
    await engine.start()
    stream = engine.generate(req("r", range(50), max_tokens=100_000))
    await anext(stream)
    await engine.stop()
    rest = [chunk async for chunk in stream]
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    load = engine.load()[0]
    assert (load.running, load.waiting) == (0, 0)
    with pytest.raises(Unavailable, match="not running"):
        await anext(engine.generate(req("late", [1], max_tokens=1)))


async def test_stop_gives_the_blocks_of_requests_in_flight_back() -> None:
    engine = MockerEngine(FAST)
    await engine.start()
    stream = engine.generate(req("r", range(50), max_tokens=100_000))
    await anext(stream)
    await engine.stop()
    rest = [chunk async for chunk in stream]
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    assert await eventually(lambda: active_blocks(engine) == [0])


async def test_events_only_for_new_blocks_with_consecutive_ids() -> None:
    events: list[KvEvent] = []
    async with MockerEngine(FAST) as engine:
        engine.subscribe_kv_events(events.append)
        await collect(engine, req("a", range(200), max_tokens=1))
        assert [e.event_id for e in events] == [0]
        assert isinstance(events[0].data, KvStored) and len(events[0].data.blocks) == 3
        await collect(engine, req("b", range(200), max_tokens=1))
        assert len(events) == 1  # the same prompt again: every full block is a cache hit
        await collect(engine, req("c", [*range(128), *range(900, 972)], max_tokens=1))
        assert len(events) == 2
        stored = events[1].data
        assert isinstance(stored, KvStored) and stored.start_position == 2 and len(stored.blocks) == 1
        assert engine.cached_block_hashes(0) == {
            b.block_hash for e in events if isinstance(e.data, KvStored) for b in e.data.blocks
        }
        engine.reset_prefix_cache()
        assert events[-1] == KvEvent(2, 0, KvCleared())
        # The snapshot names the id of the next event (it was the last one's, 2, before).
        snapshot = engine.kv_snapshot(0)
        assert (snapshot.dp_rank, snapshot.next_event_id, snapshot.chains) == (0, 3, ())
        assert engine.cached_block_hashes(0) == set()


async def test_event_listener_task_and_snapshot() -> None:
    async with MockerEngine(FAST) as engine:
        # Changed: the async event iterator is gone; a listener feeding a queue replaces it.
        queue: asyncio.Queue[KvEvent] = asyncio.Queue()
        engine.subscribe_kv_events(queue.put_nowait)
        received: list[KvEvent] = []

        async def listen() -> None:
            while len(received) < 2:
                received.append(await queue.get())

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0)
        await collect(engine, req("a", range(128), max_tokens=1))
        await collect(engine, req("b", range(500, 628), max_tokens=1))
        await asyncio.wait_for(listener, timeout=30)
        assert [e.event_id for e in received] == [0, 1]
        snapshot = engine.kv_snapshot(0)
        assert snapshot.next_event_id == 2
        assert {b.block_hash for e in snapshot.chains for b in e.blocks} == {
            b.block_hash for e in received if isinstance(e.data, KvStored) for b in e.data.blocks
        }
        with pytest.raises(InvalidArgument, match="dp_rank"):
            engine.kv_snapshot(1)


async def test_decode_role_publishes_events_like_any_other() -> None:
    # Routers must see what decode workers hold (conditional disaggregation weighs it).
    events: list[KvEvent] = []
    async with MockerEngine(FAST, role=EngineRole.DECODE) as engine:
        assert engine.publishes_kv_events
        assert engine.info().publishes_kv_events
        engine.subscribe_kv_events(events.append)
        chunks = await collect(engine, req("d", range(300), max_tokens=3))
        assert sum(len(c.token_ids) for c in chunks) == 3
        stored = {b.block_hash for c in engine.kv_snapshot(0).chains for b in c.blocks}
    assert stored == set(block_hashes(list(range(300)), 64)[1])
    assert {b.block_hash for e in events if isinstance(e.data, KvStored) for b in e.data.blocks} == stored


async def test_prefill_role_returns_one_token_with_kv_transfer() -> None:
    prompt = range(300)
    async with MockerEngine(FAST, role=EngineRole.PREFILL) as engine:
        chunks = await collect(engine, req("p", prompt, max_tokens=100))
        # The simulated hand-off holds nothing once it is over.
        assert await eventually(lambda: active_blocks(engine) == [0])
    assert [len(c.token_ids) for c in chunks] == [1]
    last = chunks[-1]
    assert last.finish_reason is FinishReason.LENGTH
    transfer = last.kv_transfer
    assert transfer is not None
    assert transfer.transfer_id == "p" and transfer.num_tokens == 300
    assert transfer.block_hashes == tuple(block_hashes(list(prompt), 64)[1])  # 4 full blocks
    # A decode worker takes the transferred prompt as computed: it reports it all as cached.
    async with MockerEngine(FAST, role=EngineRole.DECODE) as decode:
        continued = await collect(decode, req("p", prompt, max_tokens=3, kv_transfer=transfer))
    usage = continued[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (
        300,
        3,
        300,
    )


async def test_data_parallel_ranks_balance_and_number_events_separately() -> None:
    events: list[KvEvent] = []
    async with MockerEngine(MockerConfig(speedup_ratio=0, dp_size=2)) as engine:
        engine.subscribe_kv_events(events.append)
        a = engine.generate(req("a", range(100), max_tokens=1000))
        b = engine.generate(req("b", range(100), max_tokens=1000))
        await anext(a)
        await anext(b)
        # Changed: chunks no longer name their rank; the per-rank load shows one request on each.
        loads = engine.load()
        assert [load.running for load in loads] == [1, 1]
        assert all(load.total_blocks == 16384 for load in loads)
        await a.aclose()
        await b.aclose()
        pinned = engine.generate(req("c", range(500, 600), max_tokens=1000, dp_rank=1))
        await anext(pinned)
        assert [load.running for load in engine.load()] == [0, 1]
        await pinned.aclose()
        assert await eventually(lambda: active_blocks(engine) == [0, 0])
    # Each rank numbers its own events from 0 (how many depends on the tokens generated before
    # the streams were closed); rank 1 stored blocks for both of its requests.
    for rank in (0, 1):
        ids = sorted(e.event_id for e in events if e.dp_rank == rank)
        assert ids == list(range(len(ids))) and ids
    assert len([e for e in events if e.dp_rank == 1]) >= 2


async def test_load_counts_waiting_and_prefill_tokens() -> None:
    config = MockerConfig(speedup_ratio=0, max_num_seqs=1)
    async with MockerEngine(config, perf_model=Glacial()) as engine:
        reports: list[StepMetrics] = []
        engine.subscribe_steps(reports.append)
        a = engine.generate(req("a", range(100), max_tokens=1000))
        b = engine.generate(req("b", range(1000, 1300), max_tokens=1))
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
    # Changed: a step reports measured wall time, not model time (0 at speedup 0); a modelled
    # step would have taken a day.
    assert reports and reports[0].wall_time_s < 60
    assert reports[0].scheduled.num_prefill_requests == 1
    assert reports[0].scheduled.sum_prefill_tokens == 100
