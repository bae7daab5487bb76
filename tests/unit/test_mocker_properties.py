"""Properties of the simulation (the batching core with the mocker's executor) under random
workloads: step bounds, block conservation, progress, and an event stream that reproduces the
cache exactly when replayed into a router-style index."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from tokenyard.common.hashing import block_hashes, chain_hash
from tokenyard.worker.engines.base import EngineRequest
from tokenyard.worker.engines.core.block_pool import BlockPool, BlockTable
from tokenyard.worker.engines.core.scheduler import Scheduler
from tokenyard.worker.engines.mocker.config import MockerConfig, PreemptionMode
from tokenyard.worker.engines.mocker.engine import MockerEngine
from tokenyard.worker.engines.mocker.executor import (
    MockerExecutor,
    pseudo_token,
    rank_by_hand,
    request_seed,
    step_by_hand,
)
from tokenyard.worker.engines.mocker.perf_model import PolynomialPerfModel
from tokenyard.worker.kv_events import (
    KvCleared,
    KvEvent,
    KvEventData,
    KvEventPublisher,
    KvRemoved,
    KvStored,
)

pytestmark = pytest.mark.unit

PREFIXES = [
    list(range(1000, 1064)),
    list(range(2000, 2064)),
    list(range(1000, 1032)) + list(range(3000, 3032)),
]


@dataclass
class ReplayIndex:
    """What a router learns from one rank's events: the set of cached sequence hashes."""

    blocks: set[int] = field(default_factory=set)
    next_id: int = 0

    def apply(self, event: KvEvent) -> None:
        assert event.event_id == self.next_id, "event ids are consecutive from 0"
        self.next_id += 1
        data = event.data
        if isinstance(data, KvStored):
            parent = data.parent_hash
            assert parent is None or parent in self.blocks, "a stored chain hangs off a known block"
            for block in data.blocks:
                assert block.block_hash not in self.blocks, "stored only for blocks new to the cache"
                expected = block.tokens_hash if parent is None else chain_hash(parent, block.tokens_hash)
                assert block.block_hash == expected, "sequence hash chains the local hashes"
                self.blocks.add(block.block_hash)
                parent = block.block_hash
        elif isinstance(data, KvRemoved):
            for h in data.block_hashes:
                assert h in self.blocks, "removed only what was stored"
                self.blocks.remove(h)
        else:
            assert isinstance(data, KvCleared)
            self.blocks.clear()


@st.composite
def configs(draw: st.DrawFn) -> MockerConfig:
    return MockerConfig(
        block_size=draw(st.sampled_from([1, 2, 4])),
        num_gpu_blocks=draw(st.integers(4, 40)),
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 96)),
        enable_chunked_prefill=draw(st.booleans()),
        enable_prefix_caching=draw(st.booleans()),
        preemption_mode=draw(st.sampled_from(list(PreemptionMode))),
        vocab_size=draw(st.sampled_from([2, 5, 49152])),
    )


add_op = st.tuples(
    st.just("add"),
    st.integers(0, len(PREFIXES) - 1),  # which shared prefix
    st.integers(0, 24),  # how much of it
    st.integers(1, 16),  # own suffix length
    st.integers(1, 48),  # max_tokens
    st.integers(0, 2),  # priority
)
ops = st.lists(
    st.one_of(
        add_op, st.tuples(st.just("step"), st.integers(1, 8)), st.tuples(st.just("abort"), st.integers(0, 50))
    ),
    max_size=40,
)


def make_request(
    config: MockerConfig, n: int, op: tuple[str, int, int, int, int, int]
) -> EngineRequest | None:
    _, prefix, prefix_len, suffix_len, max_tokens, priority = op
    prompt = PREFIXES[prefix][:prefix_len] + [50_000 + n * 100 + i for i in range(suffix_len)]
    limit = config.max_sequence_len - 1
    if not config.enable_chunked_prefill:
        limit = min(limit, config.max_num_batched_tokens)
    prompt = prompt[:limit]
    if not prompt:
        return None
    return EngineRequest(f"r{n}", tuple(prompt), max_tokens=max_tokens, priority=priority)


def build(config: MockerConfig, sink: Callable[[KvEventData], object]) -> tuple[Scheduler, MockerExecutor]:
    """One rank of the simulated engine, built as the engine builds it."""
    return rank_by_hand(config, perf_model=PolynomialPerfModel(), sink=sink)


def held_blocks(s: Scheduler) -> int:
    """Blocks the live requests hold, shared ones once; each held exactly as often as it is counted."""
    holders = Counter(id(block) for seq in [*s.running, *s.waiting] for block in seq.table.blocks)
    for seq in [*s.running, *s.waiting]:
        for block in seq.table.blocks:
            assert block.refcount == holders[id(block)], "a block's refcount is the tables holding it"
    return len(holders)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), script=ops, seed=st.integers(0, 2**16))
def test_random_workload_keeps_bounds_conserves_blocks_and_replays(
    config: MockerConfig, script: list[tuple[object, ...]], seed: int
) -> None:
    publisher = KvEventPublisher(0)
    index = ReplayIndex()
    publisher.subscribe(index.apply)
    s, executor = build(config, publisher.publish)
    blocks = s.pool
    rng = random.Random(seed)
    requests: dict[str, EngineRequest] = {}
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    aborted: set[str] = set()
    seen = {"preempted": 0, "evicted": 0}

    def count_evictions(e: KvEvent) -> None:
        seen["evicted"] += isinstance(e.data, KvRemoved)

    publisher.subscribe(count_evictions)

    def check() -> None:
        assert blocks.num_free_blocks >= 0 and blocks.num_inactive_blocks >= 0
        # num_free_blocks counts the (evictable) inactive blocks too.
        assert blocks.num_inactive_blocks <= blocks.num_free_blocks
        assert blocks.num_active_blocks + blocks.num_free_blocks == config.num_gpu_blocks
        assert blocks.num_active_blocks == held_blocks(s)
        assert index.blocks == blocks.cached_hashes()

    def step() -> None:
        result = step_by_hand(s, executor)
        assert result.scheduled_tokens <= config.max_num_batched_tokens
        assert result.num_running == len(s.running) <= config.max_num_seqs
        seen["preempted"] += len(result.preempted)
        for out in result.outputs:
            tokens[out.seq.request_id].append(out.token_id)
            if out.finish_reason is not None:
                finished.add(out.seq.request_id)
        check()

    for n, op in enumerate(script):
        if op[0] == "add":
            request = make_request(config, n, op)  # type: ignore[arg-type]
            if request is not None:
                s.add(request, executor.sampler(request))
                requests[request.request_id] = request
                tokens[request.request_id] = []
        elif op[0] == "step":
            for _ in range(int(op[1])):  # type: ignore[call-overload]
                step()
        else:
            live = sorted(rid for rid in requests if rid in s)
            if live:
                victim = live[int(op[1]) % len(live)]  # type: ignore[call-overload]
                assert s.abort(victim)
                aborted.add(victim)
                check()

    steps = 0
    while s.has_work:
        steps += 1
        assert steps < 50_000, "the scheduler stopped making progress"
        if rng.random() < 0.01:
            live = sorted(rid for rid in requests if rid in s)
            victim = rng.choice(live)
            s.abort(victim)
            aborted.add(victim)
            check()
        step()

    # Steer generation towards workloads under memory pressure, where the bugs would hide.
    target(float(seen["preempted"]), label="preemptions")
    target(float(seen["evicted"]), label="evictions")
    event(f"preempted: {seen['preempted'] > 0}")
    event(f"evicted: {seen['evicted'] > 0}")
    assert blocks.num_active_blocks == 0
    assert blocks.num_free_blocks == config.num_gpu_blocks
    assert index.next_id == publisher.last_event_id + 1
    for rid, request in requests.items():
        seed_ = request_seed(rid, request.sampling.seed)
        want = [
            pseudo_token(seed_, len(request.token_ids) + k, config.vocab_size)
            for k in range(len(tokens[rid]))
        ]
        assert tokens[rid] == want
        if rid in finished:
            assert request.max_tokens is not None
            assert len(tokens[rid]) == min(
                request.max_tokens, config.max_sequence_len - len(request.token_ids)
            )
        else:
            assert rid in aborted


@settings(max_examples=100, deadline=None)
@given(
    chains=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 12), st.booleans()), max_size=30),
    num_blocks=st.integers(2, 24),
    resets=st.sets(st.integers(0, 29), max_size=3),
)
def test_block_pool_events_replay_through_resets(
    chains: list[tuple[int, int, bool]], num_blocks: int, resets: set[int]
) -> None:
    publisher = KvEventPublisher(0)
    index = ReplayIndex()
    publisher.subscribe(index.apply)
    pool = BlockPool(num_blocks, 2, sink=publisher.publish)
    held: list[BlockTable] = []
    for i, (family, n_tokens, keep) in enumerate(chains):
        tokens = [family * 10 + (t % 3) for t in range(n_tokens)]
        local, seq = block_hashes(tokens, 2)
        table = BlockTable()
        # Start from the cached prefix (at least the last token computed), like the scheduler ...
        prefix = pool.match_prefix(seq[: (n_tokens - 1) // 2])
        start = len(prefix) * 2
        if pool.allocate(table, start + 1, prefix):
            pool.commit(table, start + 1, seq, local)
            for upto in range(start + 2, n_tokens + 1):  # ... then grow token by token, like decoding
                if not pool.allocate(table, upto):
                    break
                pool.commit(table, upto, seq, local)
        if keep:
            held.append(table)
        else:
            pool.release(table)
        if i in resets:
            pool.reset()
        assert index.blocks == pool.cached_hashes()
        assert pool.num_active_blocks + pool.num_free_blocks == num_blocks
    for table in held:
        pool.release(table)
    assert pool.num_active_blocks == 0
    assert pool.num_free_blocks == num_blocks
    assert index.blocks == pool.cached_hashes()


async def test_engine_event_stream_replays_to_each_ranks_cache() -> None:
    config = MockerConfig(block_size=4, num_gpu_blocks=24, dp_size=2, speedup_ratio=0, max_num_seqs=3)
    engine = MockerEngine(config)
    indexes = {0: ReplayIndex(), 1: ReplayIndex()}
    engine.subscribe_kv_events(lambda e: indexes[e.dp_rank].apply(e))
    rng = random.Random(3)

    async def one(n: int) -> None:
        prefix = PREFIXES[n % 3][: rng.randrange(0, 40)]
        prompt = prefix + [9000 + n * 50 + i for i in range(rng.randrange(1, 20))]
        request = EngineRequest(f"r{n}", tuple(prompt), max_tokens=rng.randrange(1, 30), dp_rank=n % 2)
        async with contextlib.aclosing(engine.generate(request)) as stream:
            async for chunk in stream:
                if n % 5 == 0 and chunk.token_ids:
                    break  # a client that goes away mid-stream

    async with engine:
        await asyncio.gather(*(one(n) for n in range(40)))
        for rank in (0, 1):
            assert indexes[rank].blocks == engine.ranks[rank].pool.cached_hashes()
            assert indexes[rank].blocks == engine.cached_block_hashes(rank)
            snapshot = engine.kv_snapshot(rank)
            assert snapshot.next_event_id == indexes[rank].next_id
            rebuilt = ReplayIndex()
            for i, stored in enumerate(snapshot.chains):
                rebuilt.apply(KvEvent(i, rank, stored))
            assert rebuilt.blocks == indexes[rank].blocks
        # Blocks of a client that left mid-step go back when that step ends: give the loop a turn.
        for _ in range(100):
            if all(load.active_blocks == 0 for load in engine.load()):
                break
            await asyncio.sleep(0)
        assert all(load.active_blocks == 0 for load in engine.load())
