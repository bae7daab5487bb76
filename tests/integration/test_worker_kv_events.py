"""The KV event stream: resume from an event id, snapshot when too old, replay fidelity, slow
subscribers, rank filtering, load snapshots, and the forward-pass metrics stream."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tests.fixtures.worker import RunningWorker, eventually, generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.worker.engines.base import EngineRequest, KvSnapshot, RankLoad
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.engine import MockerEngine
from tokenyard.worker.kv_events import KvRemoved, KvStored
from tokenyard.worker.kv_stream import KvEventBatch, KvEventHub

pytestmark = pytest.mark.integration

FAST = MockerConfig(speedup_ratio=0, block_size=4, num_gpu_blocks=256, max_model_len=512)
# 16 blocks: every few requests evict cached blocks, so streams carry `removed` events too.
TINY_CACHE = MockerConfig(speedup_ratio=0, block_size=4, num_gpu_blocks=16, max_model_len=64)

Stream = grpc.aio.UnaryStreamCall[worker_pb2.SubscribeKvEventsRequest, worker_pb2.SubscribeKvEventsResponse]


class Mirror:
    """What a router holds for one rank after applying a stream (snapshot parts, then events)."""

    def __init__(self) -> None:
        self.blocks: set[int] = set()
        self.next_event_id: int | None = None
        self.snapshots = 0
        self.loads: list[worker_pb2.LoadSnapshot] = []
        self.events: list[worker_pb2.KvEvent] = []
        self._parts: list[worker_pb2.KvSnapshot] = []

    def apply(self, message: worker_pb2.SubscribeKvEventsResponse) -> None:
        kind = message.WhichOneof("payload")
        if kind == "snapshot":
            self._parts.append(message.snapshot)
            if message.snapshot.has_more:
                return
            parts, self._parts = self._parts, []
            self.blocks = set()
            for part in parts:
                assert part.next_event_id == parts[0].next_event_id
                for chain in part.chains:
                    self._store(chain.stored)
            self.next_event_id = parts[0].next_event_id
            self.snapshots += 1
        elif kind == "events":
            for event in message.events.events:
                assert self.next_event_id is not None, "events before any snapshot or resume point"
                assert event.event_id == self.next_event_id, "event ids must be consecutive"
                self.next_event_id += 1
                self.events.append(event)
                data = event.WhichOneof("data")
                if data == "stored":
                    self._store(event.stored)
                elif data == "removed":
                    self.blocks.difference_update(event.removed.block_hashes)
                else:
                    self.blocks.clear()
        else:
            self.loads.append(message.load)

    def _store(self, stored: worker_pb2.KvStored) -> None:
        if stored.HasField("parent_hash"):
            assert stored.parent_hash in self.blocks, "a chain's parent must be cached already"
        self.blocks.update(b.block_hash for b in stored.blocks)


async def read(stream: Stream) -> worker_pb2.SubscribeKvEventsResponse:
    message = await asyncio.wait_for(stream.read(), timeout=20)
    assert isinstance(message, worker_pb2.SubscribeKvEventsResponse), "the stream ended"
    return message


async def catch_up(stream: Stream, mirror: Mirror, w: RunningWorker, dp_rank: int = 0) -> None:
    """Read until the mirror holds every event the engine published."""
    while mirror.next_event_id != w.server.engine.kv_snapshot(dp_rank).next_event_id or mirror._parts:
        mirror.apply(await read(stream))


def engine_blocks(w: RunningWorker, dp_rank: int = 0) -> set[int]:
    return {b.block_hash for chain in w.server.engine.kv_snapshot(dp_rank).chains for b in chain.blocks}


def subscribe(w: RunningWorker, **fields: Any) -> Stream:
    return w.stub.SubscribeKvEvents(worker_pb2.SubscribeKvEventsRequest(**fields))


async def run_prompts(w: RunningWorker, prefix: str, count: int, length: int = 12, **fields: Any) -> None:
    base = sum(map(ord, prefix)) * 1009  # distinct prefixes, distinct prompts
    for i in range(count):
        prompt = [(base + i * 7919 + k) % 30000 for k in range(length)]
        request = generate_request(f"{prefix}-{i}", prompt, 2)
        for name, value in fields.items():
            setattr(request, name, value)
        responses = await w.generate(request)
        assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH


async def test_a_new_subscriber_starts_with_a_snapshot_then_a_load() -> None:
    async with running_worker(FAST) as w:
        await run_prompts(w, "warm", 3)
        stream = subscribe(w)
        first, second = await read(stream), await read(stream)
        stream.cancel()
        assert first.WhichOneof("payload") == "snapshot"
        assert first.snapshot.next_event_id == (w.server.engine.kv_snapshot(0).next_event_id - 1) + 1
        assert {b.block_hash for c in first.snapshot.chains for b in c.stored.blocks} == engine_blocks(w)
        assert second.WhichOneof("payload") == "load"
        assert second.load.total_blocks == 256


async def test_resuming_from_a_buffered_id_replays_exactly_the_missing_events() -> None:
    async with running_worker(TINY_CACHE) as w:
        steady = subscribe(w)  # stays connected throughout: the reference
        reference = Mirror()
        await run_prompts(w, "a", 12)
        await catch_up(steady, reference, w)
        assert any(e.HasField("removed") for e in reference.events)
        # Compare by event id: the reference subscription may have started after event 0 (then
        # carried in its snapshot), so list positions and event ids need not agree.
        resume_at = reference.events[len(reference.events) // 2].event_id

        resumed = subscribe(w, resume_from_event_id={0: resume_at})
        mirror = Mirror()
        mirror.next_event_id = resume_at
        first = await read(resumed)
        assert first.WhichOneof("payload") == "events", "a buffered resume point gets no snapshot"
        mirror.apply(first)
        await catch_up(resumed, mirror, w)
        assert mirror.events == [e for e in reference.events if e.event_id >= resume_at]
        assert mirror.snapshots == 0

        # Both streams then follow the same live events.
        await run_prompts(w, "b", 4)
        await catch_up(steady, reference, w)
        await catch_up(resumed, mirror, w)
        assert mirror.events[-10:] == reference.events[-10:]
        steady.cancel()
        resumed.cancel()


async def test_resuming_at_the_next_id_gets_nothing_but_live_events() -> None:
    async with running_worker(FAST) as w:
        await run_prompts(w, "a", 3)
        next_id = (w.server.engine.kv_snapshot(0).next_event_id - 1) + 1
        stream = subscribe(w, resume_from_event_id={0: next_id})
        assert (await read(stream)).WhichOneof("payload") == "load"
        await run_prompts(w, "b", 1)
        mirror = Mirror()
        mirror.next_event_id = next_id
        await catch_up(stream, mirror, w)
        stream.cancel()
        assert mirror.snapshots == 0 and mirror.events[0].event_id == next_id


@pytest.mark.parametrize("resume_at", [0, 10**9], ids=["evicted-from-the-buffer", "never-published"])
async def test_an_unavailable_resume_point_gets_a_snapshot_and_replay_matches_the_engine(
    resume_at: int,
) -> None:
    async with running_worker(TINY_CACHE, kv_event_buffer=4) as w:
        await run_prompts(w, "old", 10)
        assert (w.server.engine.kv_snapshot(0).next_event_id - 1) > 4
        stream = subscribe(w, resume_from_event_id={0: resume_at})
        first = await read(stream)
        assert first.WhichOneof("payload") == "snapshot"
        assert first.snapshot.next_event_id == (w.server.engine.kv_snapshot(0).next_event_id - 1) + 1
        mirror = Mirror()
        mirror.apply(first)
        await run_prompts(w, "new", 10)
        await catch_up(stream, mirror, w)
        stream.cancel()
        assert mirror.events, "live events follow the snapshot"
        assert mirror.blocks == engine_blocks(w)


async def test_a_subscriber_that_does_not_read_never_blocks_the_engine() -> None:
    async with running_worker(TINY_CACHE, kv_subscriber_queue=2) as w:
        stalled = subscribe(w)
        await run_prompts(w, "busy", 60)  # would hang if publishing waited for the reader
        mirror = Mirror()
        await catch_up(stalled, mirror, w)
        stalled.cancel()
        assert mirror.blocks == engine_blocks(w)


async def test_an_overflowing_subscriber_is_resynced_with_a_fresh_snapshot() -> None:
    engine = MockerEngine(FAST)
    hub = KvEventHub(engine, buffer_size=16, queue_size=2)
    async with engine:
        subscription = hub.subscribe(None, {})
        initial = await subscription.next_items()
        assert [type(i) for i in initial] == [KvSnapshot, RankLoad]
        for i in range(5):  # five distinct prompts: at least five `stored` events, never read
            request = EngineRequest(f"r{i}", tuple(i * 100 + k for k in range(12)), max_tokens=1)
            async for _ in engine.generate(request):
                pass
        resync = await subscription.next_items()
        snapshot = resync[0]
        assert isinstance(snapshot, KvSnapshot)
        assert snapshot.next_event_id == engine.kv_snapshot(0).next_event_id
        assert {b.block_hash for c in snapshot.chains for b in c.blocks} == {
            b.block_hash for c in engine.kv_snapshot(0).chains for b in c.blocks
        }
        async for _ in engine.generate(EngineRequest("after", tuple(range(900, 912)), max_tokens=1)):
            pass
        [live] = await subscription.next_items()
        assert isinstance(live, KvEventBatch)
        assert live.events[0].event_id == snapshot.next_event_id
        assert all(isinstance(e.data, KvStored | KvRemoved) for e in live.events)
        hub.close()
        assert await subscription.next_items() == []


async def test_a_rank_filter_streams_only_that_rank() -> None:
    async with running_worker(FAST.model_copy(update={"dp_size": 2})) as w:
        stream = subscribe(w, dp_rank=1)
        mirror = Mirror()
        mirror.apply(await read(stream))
        await run_prompts(w, "zero", 2, dp_rank=0)
        await run_prompts(w, "one", 2, dp_rank=1)
        await catch_up(stream, mirror, w, dp_rank=1)
        stream.cancel()
        assert mirror.events and all(e.dp_rank == 1 for e in mirror.events)
        assert mirror.loads and all(load.dp_rank == 1 for load in mirror.loads)
        assert mirror.blocks == engine_blocks(w, 1) and not mirror.blocks & engine_blocks(w, 0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read(subscribe(w, dp_rank=2))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_load_snapshots_keep_coming_on_an_idle_stream() -> None:
    async with running_worker(FAST, load_interval=0.02) as w:
        stream = subscribe(w)
        kinds = [(await read(stream)).WhichOneof("payload") for _ in range(5)]
        assert w.server.kv_events.subscriber_count == 1
        stream.cancel()

        async def unsubscribed() -> bool:
            return w.server.kv_events.subscriber_count == 0

        await eventually(unsubscribed, "a disconnected subscriber is dropped")
    assert kinds == ["snapshot", "load", "load", "load", "load"]


async def test_forward_pass_metrics_number_every_step_and_send_idle_heartbeats() -> None:
    def idle(sample: worker_pb2.SubscribeForwardPassMetricsResponse) -> bool:
        return sample.scheduled.num_prefill_requests == 0 and sample.scheduled.num_decode_requests == 0

    async with running_worker(FAST, load_interval=0.02) as w:
        stream = w.stub.SubscribeForwardPassMetrics(worker_pb2.SubscribeForwardPassMetricsRequest())

        async def next_sample() -> worker_pb2.SubscribeForwardPassMetricsResponse:
            message = await asyncio.wait_for(stream.read(), timeout=20)
            assert isinstance(message, worker_pb2.SubscribeForwardPassMetricsResponse)
            return message

        samples = [await next_sample()]  # an idle heartbeat: the stream is live
        await run_prompts(w, "fpm", 2, length=40)
        # Two tokens each: the step that completes a prompt samples its first token (a prefill
        # request), the next one decodes the second.
        while sum(s.scheduled.num_decode_requests for s in samples) < 2 or not idle(samples[-1]):
            samples.append(await next_sample())
        stream.cancel()
    assert idle(samples[0]) and samples[0].wall_time_ms == 0
    ids = [s.step_id for s in samples]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert sum(s.scheduled.num_prefill_requests for s in samples) == 2
    assert sum(s.scheduled.sum_prefill_tokens for s in samples) == 80
    assert sum(s.scheduled.num_decode_requests for s in samples) == 2
