"""The router service in-process, on real sockets: KV streams from real and scripted workers,
gap repair, purging, hostile streams, error statuses, metrics, replica sync.

Scripted workers are real gRPC servers whose KV stream the test writes message by message, so that
gaps, snapshots and malformed input happen exactly when the test says; the happy path also runs
against the real mocker worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
from grpc.aio import EOF  # type: ignore[attr-defined]  # the stubs lack the end-of-stream marker

from tests.fixtures.worker import MODEL, generate_request, running_worker
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Instance, ModelCard, new_instance_id, open_discovery
from tokenyard.common.hashing import block_hashes, sequence_hashes
from tokenyard.router.config import RouterSettings
from tokenyard.router.server import RouterServer
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = pytest.mark.integration

BS = 16


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 20.0) -> None:
    """Poll until ``check`` holds; the timeout only guards against a hang."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


# -- a scripted worker ---------------------------------------------------------------------------


def chain_pb(locals_: list[int], parent: list[int] | None = None) -> worker_pb2.KvStored:
    prefix = parent or []
    seq = sequence_hashes(prefix + locals_)
    msg = worker_pb2.KvStored(
        blocks=[
            worker_pb2.KvBlock(block_hash=b, tokens_hash=t)
            for b, t in zip(seq[len(prefix) :], locals_, strict=True)
        ],
        start_position=len(prefix),
    )
    if prefix:
        msg.parent_hash = seq[len(prefix) - 1]
    return msg


def snapshot(rank: int, next_id: int, *chains: worker_pb2.KvStored) -> worker_pb2.SubscribeKvEventsResponse:
    return worker_pb2.SubscribeKvEventsResponse(
        snapshot=worker_pb2.KvSnapshot(
            dp_rank=rank,
            next_event_id=next_id,
            chains=[
                worker_pb2.KvSnapshotChain(tier=worker_pb2.STORAGE_TIER_DEVICE, stored=c) for c in chains
            ],
        )
    )


def events(*items: tuple[int, int, Any]) -> worker_pb2.SubscribeKvEventsResponse:
    """Items are (event id, rank, KvStored | list of removed hashes | None for cleared)."""
    batch = worker_pb2.KvEventBatch()
    for event_id, rank, data in items:
        e = batch.events.add(event_id=event_id, dp_rank=rank)
        if isinstance(data, worker_pb2.KvStored):
            e.stored.CopyFrom(data)
        elif isinstance(data, list):
            e.removed.block_hashes.extend(data)
        else:
            e.cleared.SetInParent()
    return worker_pb2.SubscribeKvEventsResponse(events=batch)


class ScriptedWorker(worker_pb2_grpc.WorkerServiceServicer):
    """Describe answers; each SubscribeKvEvents call streams what the test puts on its queue."""

    def __init__(self, dp_size: int = 1) -> None:
        self.dp_size = dp_size
        self.subscriptions: list[dict[int, int]] = []
        self.streams: list[asyncio.Queue[worker_pb2.SubscribeKvEventsResponse | None]] = []
        self.subscribed = asyncio.Event()

    async def Describe(self, request: Any, context: Any) -> worker_pb2.DescribeResponse:
        return worker_pb2.DescribeResponse(
            dp_size=self.dp_size,
            model_card=worker_pb2.ModelCard(
                name=MODEL, kv_cache_block_size=BS, total_kv_blocks=100, max_num_batched_tokens=512
            ),
            publishes_kv_events=True,
        )

    async def SubscribeKvEvents(
        self, request: Any, context: Any
    ) -> AsyncIterator[worker_pb2.SubscribeKvEventsResponse]:
        queue: asyncio.Queue[worker_pb2.SubscribeKvEventsResponse | None] = asyncio.Queue()
        self.subscriptions.append(dict(request.resume_from_event_id))
        self.streams.append(queue)
        self.subscribed.set()
        while (msg := await queue.get()) is not None:
            yield msg

    async def send(self, *msgs: worker_pb2.SubscribeKvEventsResponse) -> None:
        for msg in msgs:
            await self.streams[-1].put(msg)

    async def next_subscription(self, count: int) -> dict[int, int]:
        await eventually(lambda: len(self.subscriptions) >= count, f"subscription #{count}")
        return self.subscriptions[count - 1]


@contextlib.asynccontextmanager
async def scripted_worker(
    discovery_url: str, dp_size: int = 1, role: str = "aggregated"
) -> AsyncIterator[tuple[ScriptedWorker, Instance]]:
    servicer = ScriptedWorker(dp_size)  # type: ignore[abstract]  # serves only what the router calls
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    discovery = open_discovery(discovery_url, ttl=5)
    card = ModelCard(MODEL, "tok", BS, 4096, 100, "scripted", role)
    instance = Instance(new_instance_id(), "worker", role, f"127.0.0.1:{port}", model_card=card)
    await discovery.register(instance)
    try:
        yield servicer, instance
    finally:
        await discovery.close()
        await server.stop(None)


# -- the router ---------------------------------------------------------------------------------


class RouterClient:
    def __init__(self, server: RouterServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.stub = router_pb2_grpc.RouterServiceStub(channel)
        self.router = server.router

    async def route(
        self, locals_: Sequence[int], rid: str | None = None, **kw: Any
    ) -> router_pb2.RouteResponse:
        request = router_pb2.RouteRequest(
            request_id=rid or uuid.uuid4().hex,
            model=kw.pop("model", MODEL),
            block_hashes=locals_,
            isl_tokens=len(locals_) * BS,
            **kw,
        )
        return await self.stub.Route(request, timeout=10)

    async def dump(self) -> set[tuple[int, int, int, int | None, int, int]]:
        out: set[tuple[int, int, int, int | None, int, int]] = set()
        async for msg in self.stub.Dump(router_pb2.DumpRequest(), timeout=10):
            for c in msg.chains:
                parent = c.parent_hash if c.HasField("parent_hash") else None
                for b in c.blocks:
                    out.add((msg.worker_id, msg.dp_rank, int(msg.tier), parent, b.block_hash, b.tokens_hash))
                    parent = b.block_hash
        return out

    def overlap(self, worker_id: int, locals_: list[int], rank: int = 0) -> int:
        from tokenyard.router.index import Prompt, WorkerRank

        return self.router.index.device.find_matches(Prompt(locals_)).get(WorkerRank(worker_id, rank), 0)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.runtime.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@contextlib.asynccontextmanager
async def running_router(discovery_url: str, **overrides: Any) -> AsyncIterator[RouterClient]:
    settings = RouterSettings(
        host="127.0.0.1", port=0, metrics_port=0, discovery=discovery_url, grace_period=1.0, **overrides
    )
    async with RouterServer(settings) as server, grpc.aio.insecure_channel(server.address) as channel:
        yield RouterClient(server, channel)


@pytest.fixture
def discovery_url() -> str:
    return f"memory://router-test-{uuid.uuid4().hex}"


# -- tests ----------------------------------------------------------------------------------------


async def test_routes_by_the_cache_a_real_mocker_worker_reports() -> None:
    mocker = MockerConfig(block_size=BS, num_gpu_blocks=256, speedup_ratio=0)
    async with (
        running_worker(mocker) as w1,
        running_worker(mocker, discovery=w1.server.settings.discovery) as w2,
    ):
        url = w1.server.settings.discovery
        async with running_router(url) as r:
            await eventually(
                lambda: (
                    len(r.router.workers) == 2
                    and r.router.feeds.feed(w1.server.runtime.instance_id) is not None
                ),
                "workers seen",
            )
            prompt = list(range(1000, 1000 + 8 * BS))
            local, seq = block_hashes(prompt, BS)
            first = await r.route(local, rid="a")
            chosen = w1 if first.worker_id == w1.server.runtime.instance_id else w2
            await chosen.generate(generate_request("a", prompt, max_tokens=2))
            await r.stub.NotifyFinished(
                router_pb2.NotifyFinishedRequest(request_id="a", outcome=router_pb2.REQUEST_OUTCOME_FINISHED),
                timeout=5,
            )
            await eventually(
                lambda: r.overlap(first.worker_id, local) == 8, "the router indexed the worker's blocks"
            )
            again = await r.route([*local, 42], rid="b")
            assert (again.worker_id, again.overlap_blocks, again.cached_tokens) == (
                first.worker_id,
                8,
                8 * BS,
            )
            reply = await chosen.generate(generate_request("b", prompt + list(range(BS)), max_tokens=1))
            assert reply[-1].usage.cached_tokens == 8 * BS, "the worker had the prefix the router predicted"
            overlap = await r.stub.QueryOverlap(
                router_pb2.QueryOverlapRequest(model=MODEL, block_hashes=local), timeout=5
            )
            assert [(o.worker_id, o.matched_blocks) for o in overlap.overlaps] == [(first.worker_id, 8)]
            dump = await r.dump()
            assert {(wid, b) for wid, _, _, _, b, _ in dump} >= {(first.worker_id, h) for h in seq}
            assert (
                r.metric(
                    "tokenyard_router_kv_events_applied_total", {"event_type": "snapshot", "status": "ok"}
                )
                >= 2
            )


async def test_gap_is_repaired_by_a_snapshot_while_routing_goes_on(discovery_url: str) -> None:
    async with scripted_worker(discovery_url, dp_size=2) as (w, inst), running_router(discovery_url) as r:
        assert await w.next_subscription(1) == {}
        await w.send(snapshot(0, 0, chain_pb([1, 2, 3])), snapshot(1, 0))
        await w.send(
            events((0, 0, chain_pb([4], parent=[1, 2, 3])), (0, 1, chain_pb([7, 8])), (1, 0, chain_pb([5])))
        )
        await eventually(
            lambda: (
                r.overlap(inst.instance_id, [7, 8], rank=1) == 2 and r.overlap(inst.instance_id, [5]) == 1
            ),
            "events applied",
        )
        # Rank 0 jumps from id 2 to 9: the router drops the call and resubscribes, resuming rank 1
        # where it was and asking for a snapshot of rank 0.
        await w.send(events((9, 0, chain_pb([6]))))
        assert await w.next_subscription(2) == {1: 1}
        assert r.overlap(inst.instance_id, [1, 2, 3, 4]) == 4, "stale entries serve until the snapshot"
        decision = await r.route([1, 2, 3, 4, 99])
        assert decision.overlap_blocks == 4
        await w.send(snapshot(0, 12, chain_pb([1, 2])))
        await eventually(lambda: r.overlap(inst.instance_id, [1, 2, 3, 4]) == 2, "snapshot applied")
        await w.send(events((12, 0, chain_pb([3], parent=[1, 2])), (1, 1, [])))
        await eventually(lambda: r.overlap(inst.instance_id, [1, 2, 3]) == 3, "events after the snapshot")
        assert r.router.feeds.feed(inst.instance_id).tracker.resume_from() == {0: 13, 1: 2}  # type: ignore[union-attr]
        assert (
            r.metric("tokenyard_router_kv_events_applied_total", {"event_type": "stored", "status": "gap"})
            == 1
        )


async def test_worker_that_leaves_is_purged(discovery_url: str) -> None:
    async with running_router(discovery_url) as r:
        async with scripted_worker(discovery_url) as (w, inst):
            await w.next_subscription(1)
            await w.send(snapshot(0, 0, chain_pb([1, 2])))
            await eventually(lambda: r.overlap(inst.instance_id, [1, 2]) == 2, "indexed")
            await r.route([1, 2], rid="x")
            assert len(r.router.active) == 1
        await eventually(lambda: len(r.router.workers) == 0, "worker gone from discovery")
        assert r.router.index.num_blocks() == 0 and len(r.router.active) == 0
        assert await r.dump() == set()
        assert r.router.feeds.feed(inst.instance_id) is None


async def test_hostile_stream_is_counted_and_others_go_on(discovery_url: str) -> None:
    async with (
        running_router(discovery_url, max_batch_events=50, max_event_blocks=100) as r,
        scripted_worker(discovery_url) as (bad, bad_inst),
        scripted_worker(discovery_url) as (good, good_inst),
    ):
        await bad.next_subscription(1)
        await good.next_subscription(1)
        await bad.send(snapshot(0, 0, chain_pb([1, 2])))
        await good.send(snapshot(0, 0))
        hostile = worker_pb2.KvStored(
            parent_hash=12345, blocks=[worker_pb2.KvBlock(block_hash=1, tokens_hash=2)]
        )
        await bad.send(
            events(
                (0, 0, hostile),
                (1, 0, chain_pb(list(range(10, 300)))),
                (1, 0, None),
                (2, 0, chain_pb([3], parent=[1, 2])),
            ),
        )
        await good.send(events((0, 0, chain_pb([50, 51]))))
        await eventually(lambda: r.overlap(bad_inst.instance_id, [1, 2, 3]) == 3, "the valid event applied")
        await eventually(
            lambda: r.overlap(good_inst.instance_id, [50, 51]) == 2, "the good worker's event applied"
        )

        def status(s: str) -> float:
            return r.metric("tokenyard_router_kv_events_applied_total", {"event_type": "stored", "status": s})

        assert status("unknown_parent") == 1 and status("too_large") == 1
        assert (
            r.metric(
                "tokenyard_router_kv_events_applied_total", {"event_type": "cleared", "status": "duplicate"}
            )
            == 1
        )
        # A batch past the limit breaks the contract: that stream is dropped and reopened (with a
        # snapshot request for the rank), the good worker's stream never notices.
        await bad.send(events(*((i, 0, None) for i in range(3, 60))))
        assert await bad.next_subscription(2) == {}
        await good.send(events((1, 0, chain_pb([52], parent=[50, 51]))))
        await eventually(
            lambda: r.overlap(good_inst.instance_id, [50, 51, 52]) == 3, "the good stream goes on"
        )
        assert r.overlap(bad_inst.instance_id, [1, 2, 3]) == 3, "the rejected batch changed nothing"
        assert len(good.subscriptions) == 1
        assert r.metric("tokenyard_router_kv_resyncs_total", {"reason": "too_large"}) == 1


async def test_error_statuses_tell_unavailable_from_overloaded(discovery_url: str) -> None:
    async with (
        running_router(discovery_url, active_prefill_tokens_threshold=10) as r,
        scripted_worker(discovery_url) as (w, _inst),
    ):
        await w.next_subscription(1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.route([1], model="nope")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no worker" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.route([1], pool=router_pb2.WORKER_POOL_PREFILL)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no worker" in (err.value.details() or "")
        await r.route([1, 2])  # 32 prefill tokens: the only worker is busy now
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.route([3])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.route([1], hints=router_pb2.RouteHints(temperature=-1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reported_load_feeds_busy_detection(discovery_url: str) -> None:
    async with (
        running_router(discovery_url, active_decode_blocks_threshold=0.5) as r,
        scripted_worker(discovery_url) as (w, inst),
    ):
        await w.next_subscription(1)
        await w.send(snapshot(0, 0))
        await r.route([1])
        await w.send(
            worker_pb2.SubscribeKvEventsResponse(
                load=worker_pb2.LoadSnapshot(dp_rank=0, active_blocks=80, total_blocks=100)
            )
        )
        await eventually(lambda: 0 in r.router.workers.get(inst.instance_id).loads, "load received")  # type: ignore[union-attr]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.route([1])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_metrics_endpoint(discovery_url: str) -> None:
    async with running_router(discovery_url) as r, scripted_worker(discovery_url) as (w, inst):
        await w.next_subscription(1)
        await w.send(
            worker_pb2.SubscribeKvEventsResponse(load=worker_pb2.LoadSnapshot(dp_rank=0, total_blocks=100))
        )
        reply = await r.route([1, 2, 3], rid="m")
        assert reply.mode == router_pb2.ROUTING_MODE_KV
        await r.stub.NotifyFirstToken(router_pb2.NotifyFirstTokenRequest(request_id="m"), timeout=5)
        port = r.server.runtime.metrics_port

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return str(resp.read().decode())

        async def gauges_ready() -> bool:
            return (
                f'tokenyard_router_worker_active_requests{{dp_rank="0",worker_id="{inst.instance_id}"}} 1.0'
                in await asyncio.to_thread(scrape)
            )

        await eventually(gauges_ready, "worker gauges refreshed")
        text = await asyncio.to_thread(scrape)
        for name in (
            'tokenyard_router_decisions_total{mode="kv"} 1.0',
            "tokenyard_router_kv_hit_rate_count 1.0",
            'tokenyard_router_overhead_seconds_count{stage="index_lookup"} 1.0',
            "tokenyard_router_time_to_first_token_seconds_count 1.0",
            'tokenyard_router_kv_events_applied_total{event_type="load",status="ok"}',
        ):
            assert name in text, name


async def test_replicas_share_predicted_load(discovery_url: str) -> None:
    async with (
        running_router(discovery_url, replica_sync=True) as a,
        running_router(discovery_url, replica_sync=True) as b,
        scripted_worker(discovery_url) as (_w, inst),
    ):
        await eventually(
            lambda: a.router.hub.subscribers == 1 and b.router.hub.subscribers == 1,
            "replicas subscribed",
        )
        await a.route([1, 2, 3], rid="q")
        await eventually(lambda: b.router.active.get("q") is not None, "b learned a's route")
        assert b.router.active.load(inst.instance_id).active_prefill_tokens == 3 * BS
        # The frontend may tell either replica (failover); both end up agreeing, without echo.
        await b.stub.NotifyFirstToken(router_pb2.NotifyFirstTokenRequest(request_id="q"), timeout=5)
        await eventually(
            lambda: a.router.active.load(inst.instance_id).active_prefill_tokens == 0,
            "a learned the first token",
        )
        await a.stub.NotifyFinished(
            router_pb2.NotifyFinishedRequest(request_id="q", outcome=router_pb2.REQUEST_OUTCOME_FINISHED),
            timeout=5,
        )
        await eventually(lambda: len(b.router.active) == 0, "b freed it")
        assert len(a.router.active) == 0
        assert (
            a.metric(
                "tokenyard_router_replica_events_total", {"direction": "received", "kind": "first_token"}
            )
            == 1
        )


async def test_replicas_share_session_bindings_and_what_workers_keep(discovery_url: str) -> None:
    async with (
        running_router(discovery_url, replica_sync=True) as a,
        running_router(discovery_url, replica_sync=True) as b,
        scripted_worker(discovery_url) as (_w1, first),
        scripted_worker(discovery_url) as (_w2, second),
    ):
        await eventually(
            lambda: a.router.hub.subscribers == 1 and b.router.hub.subscribers == 1,
            "replicas subscribed",
        )
        await eventually(lambda: len(b.router.workers) == 2, "b sees both workers")
        turn1 = await a.route([11, 12, 13], rid="t1", hints=router_pb2.RouteHints(session_id="chat-9"))
        chosen = turn1.worker_id
        await eventually(lambda: b.router.active.get("t1") is not None, "b learned a's route")
        # b counts t1's load on the chosen worker, so on load alone it would pick the other one;
        # the session follows the conversation there instead.
        turn2 = await b.route([21, 22], rid="t2", hints=router_pb2.RouteHints(session_id="chat-9"))
        assert turn2.worker_id == chosen
        other = await b.route([31, 32], rid="t3")
        assert other.worker_id != chosen and other.worker_id in {first.instance_id, second.instance_id}
        # And b's forecast of what the chosen worker keeps holds the prompt a routed there.
        kept = {rank.worker_id for rank in b.router.scheduler.forecast.ranks}
        assert chosen in kept


# -- the notification stream ------------------------------------------------------------------------


def first_token_note(rid: str) -> router_pb2.LifecycleNotification:
    return router_pb2.LifecycleNotification(first_token=router_pb2.NotifyFirstTokenRequest(request_id=rid))


def finished_note(
    rid: str, outcome: router_pb2.RequestOutcome.ValueType = router_pb2.REQUEST_OUTCOME_FINISHED
) -> router_pb2.LifecycleNotification:
    return router_pb2.LifecycleNotification(
        finished=router_pb2.NotifyFinishedRequest(request_id=rid, outcome=outcome, output_tokens=3)
    )


def notes(*items: router_pb2.LifecycleNotification) -> router_pb2.StreamNotificationsRequest:
    return router_pb2.StreamNotificationsRequest(notifications=items)


def open_notifications(
    r: RouterClient,
) -> grpc.aio.StreamStreamCall[router_pb2.StreamNotificationsRequest, router_pb2.StreamNotificationsResponse]:
    # Written with call.write(), as the frontend does, so that each write is one message.
    return r.stub.StreamNotifications()  # type: ignore[call-arg]


async def acknowledged(
    call: grpc.aio.StreamStreamCall[
        router_pb2.StreamNotificationsRequest, router_pb2.StreamNotificationsResponse
    ],
    count: int,
) -> list[int]:
    """Reads acknowledgements until one covers ``count`` notifications; returns all of them."""
    seen: list[int] = []
    while not seen or seen[-1] < count:
        reply = await asyncio.wait_for(call.read(), 10)
        assert isinstance(reply, router_pb2.StreamNotificationsResponse), f"ended after acknowledging {seen}"
        seen.append(reply.handled)
    return seen


async def test_notification_stream_applies_in_order_once_per_request(discovery_url: str) -> None:
    async with running_router(discovery_url) as r, scripted_worker(discovery_url) as (w, inst):
        await w.next_subscription(1)
        for rid in ("a", "b", "c"):
            await r.route([1, 2, 3], rid=rid)
        load = r.router.active.load
        assert load(inst.instance_id).active_prefill_tokens == 3 * 3 * BS
        call = open_notifications(r)
        # A first token and an end in one message; an end without a first token; a duplicate and an
        # unknown request, which count as handled and change nothing.
        await call.write(notes(first_token_note("a"), finished_note("a"), finished_note("b")))
        await call.write(notes(finished_note("a"), first_token_note("nobody"), first_token_note("c")))
        acks = await acknowledged(call, 6)
        assert acks == sorted(acks) and acks[-1] == 6
        assert [req.request_id for req in r.router.active] == ["c"]
        assert load(inst.instance_id).active_requests == 1
        assert load(inst.instance_id).active_prefill_tokens == 0, "c's first token applied"
        assert r.metric("tokenyard_router_time_to_first_token_seconds_count") == 2
        # The unary calls see the same at-most-once state.
        late = await r.stub.NotifyFinished(
            router_pb2.NotifyFinishedRequest(request_id="b", outcome=router_pb2.REQUEST_OUTCOME_FINISHED),
            timeout=5,
        )
        assert not late.applied
        await call.write(notes(finished_note("c", router_pb2.REQUEST_OUTCOME_CANCELLED)))
        await call.done_writing()
        assert (await acknowledged(call, 7))[-1] == 7
        assert await asyncio.wait_for(call.read(), 10) is EOF
        assert await call.code() == grpc.StatusCode.OK
        assert len(r.router.active) == 0


async def test_a_malformed_notification_ends_the_stream_after_what_came_before(discovery_url: str) -> None:
    async with running_router(discovery_url) as r, scripted_worker(discovery_url) as (w, _inst):
        await w.next_subscription(1)
        await r.route([1], rid="a")
        await r.route([1], rid="b")
        call = open_notifications(r)
        await call.write(
            notes(
                finished_note("a"),
                finished_note("b", router_pb2.REQUEST_OUTCOME_UNSPECIFIED),
                finished_note("b"),
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while (await asyncio.wait_for(call.read(), 10)) is not EOF:
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [req.request_id for req in r.router.active] == ["b"], "a applied, nothing after the bad one"


async def test_shutdown_ends_notification_streams_after_a_last_acknowledgement(discovery_url: str) -> None:
    async with running_router(discovery_url) as r, scripted_worker(discovery_url) as (w, _inst):
        await w.next_subscription(1)
        await r.route([1], rid="a")
        call = open_notifications(r)
        await call.write(notes(finished_note("a")))
        await acknowledged(call, 1)
        r.server.router.servicer.close()
        assert await asyncio.wait_for(call.read(), 10) is EOF
        assert await call.code() == grpc.StatusCode.OK
        # A stream opened during shutdown ends at once: its caller resends elsewhere.
        late = open_notifications(r)
        assert await asyncio.wait_for(late.read(), 10) is EOF
        assert len(r.router.active) == 0
