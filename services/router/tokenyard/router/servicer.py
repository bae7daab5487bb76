"""RouterService: proto in → routing domain → proto out, nothing else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import grpc

from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.common.errors import InvalidArgument
from tokenyard.router.active import Outcome
from tokenyard.router.client_leases import DEFAULT_RELEASE_AFTER, ClientLeases, client_of
from tokenyard.router.index import Chain, Prompt, WorkerRank
from tokenyard.router.index.tiers import Tier
from tokenyard.router.policies import RoutingMode
from tokenyard.router.replication.replicas import FirstToken, ReplicaEvent, ReplicaHub, Routed
from tokenyard.router.route_bounds import check_route_bounds
from tokenyard.router.route_queue import RouteQueue
from tokenyard.router.scheduler import RouteHints, RouteQuery, Scheduler

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name

# Derived from RoutingMode by name (RoutingMode.X <-> ROUTING_MODE_X): a mode missing from the
# proto fails here, at import, and tests/unit/test_router_modes.py checks the other direction.
MODE_ENUMS: dict[str, router_pb2.RoutingMode.ValueType] = {
    mode: router_pb2.RoutingMode.Value(f"ROUTING_MODE_{mode.name}") for mode in RoutingMode
}
MODE_NAMES: dict[router_pb2.RoutingMode.ValueType, str] = {value: mode for mode, value in MODE_ENUMS.items()}
POOL_NAMES = {
    router_pb2.WORKER_POOL_UNSPECIFIED: "",
    router_pb2.WORKER_POOL_AGGREGATED: "aggregated",
    router_pb2.WORKER_POOL_PREFILL: "prefill",
    router_pb2.WORKER_POOL_DECODE: "decode",
}
POOL_ENUMS = {name: value for value, name in POOL_NAMES.items()}
_OUTCOMES = {
    router_pb2.REQUEST_OUTCOME_FINISHED: Outcome.FINISHED,
    router_pb2.REQUEST_OUTCOME_FAILED: Outcome.FAILED,
    router_pb2.REQUEST_OUTCOME_CANCELLED: Outcome.CANCELLED,
}
# The longest a notification stream waits before acknowledging what it handled: acknowledgements
# only bound what a caller resends after a broken call, so a few per second and stream are plenty,
# and each one costs both ends a message.
ACK_INTERVAL_SECONDS = 0.02
# Blocks per DumpResponse: a rank larger than this is sent in several messages, in order.
DUMP_BLOCKS_PER_MESSAGE = 262_144

NextEventId = Callable[[WorkerRank], int | None]


def hints_from_pb(h: router_pb2.RouteHints) -> RouteHints:
    mode: str | None = None
    if h.mode != router_pb2.ROUTING_MODE_UNSPECIFIED:
        mode = MODE_NAMES.get(h.mode)
        if mode is None:
            raise InvalidArgument(f"unknown routing mode {h.mode}")
    return RouteHints(
        mode=mode,
        overlap_score_credit=h.overlap_score_credit if h.HasField("overlap_score_credit") else None,
        prefill_load_scale=h.prefill_load_scale if h.HasField("prefill_load_scale") else None,
        temperature=h.temperature if h.HasField("temperature") else None,
        pinned_worker_id=h.pinned_worker_id if h.HasField("pinned_worker_id") else None,
        allowed_worker_ids=frozenset(h.allowed_worker_ids),
        dp_rank=h.dp_rank if h.HasField("dp_rank") else None,
        expected_output_tokens=h.expected_output_tokens if h.HasField("expected_output_tokens") else None,
        priority=h.priority,
        session_id=h.session_id,
    )


def replica_event_to_pb(item: ReplicaEvent) -> router_pb2.SubscribeReplicaEventsResponse:
    msg = router_pb2.SubscribeReplicaEventsResponse(
        router_id=item.router_id, sequence=item.sequence, timestamp_unix_ns=item.timestamp_unix_ns
    )
    event = item.event
    if isinstance(event, Routed):
        routed = msg.routed
        routed.request_id = event.request_id
        routed.worker_id = event.worker_id
        routed.dp_rank = event.dp_rank
        routed.sequence_hashes.extend(event.sequence_hashes)
        routed.isl_tokens = event.isl_tokens
        routed.cached_tokens = event.cached_tokens
        if event.expected_output_tokens is not None:
            routed.expected_output_tokens = event.expected_output_tokens
        routed.pool = POOL_ENUMS.get(event.pool, router_pb2.WORKER_POOL_UNSPECIFIED)
        routed.session_id = event.session_id
    elif isinstance(event, FirstToken):
        msg.first_token.request_id = event.request_id
    else:
        msg.freed.request_id = event.request_id
    return msg


def _chains_to_pb(chains: list[Chain]) -> list[router_pb2.KvChain]:
    out = []
    for c in chains:
        msg = router_pb2.KvChain(
            blocks=[
                router_pb2.KvBlock(block_hash=b, tokens_hash=t)
                for b, t in zip(c.block_hashes, c.tokens_hashes, strict=True)
            ]
        )
        if c.parent_hash is not None:
            msg.parent_hash = c.parent_hash
        out.append(msg)
    return out


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self,
        scheduler: Scheduler,
        hub: ReplicaHub,
        next_event_id: NextEventId | None = None,
        *,
        queue: RouteQueue | None = None,
        release_after: float = DEFAULT_RELEASE_AFTER,
    ) -> None:
        self._scheduler = scheduler
        # Requests of a client whose notification stream broke for good stop counting as load.
        self.leases = ClientLeases(
            lambda rid: scheduler.finish(rid, Outcome.CANCELLED),
            lambda rid: scheduler.active.get(rid) is not None,
            release_after,
        )
        # Without a queue, a request finding every worker busy is refused at once.
        self._queue = queue
        self._hub = hub
        self._next_event_id = next_event_id or (lambda rank: None)
        self._streams: set[_Progress] = set()
        self._closed = False

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.RouteResponse:
        pool = POOL_NAMES.get(request.pool)
        if pool is None:
            raise InvalidArgument(f"unknown worker pool {request.pool}")
        query = RouteQuery(
            request_id=request.request_id,
            model=request.model,
            local_hashes=request.block_hashes,
            isl_tokens=request.isl_tokens,
            sequence_hashes=request.sequence_hashes or None,
            pool=pool,
            hints=hints_from_pb(request.hints),
            dry_run=request.dry_run,
        )
        # Before anything is recorded: a prompt longer than the model's context would otherwise
        # skew the load and overlap every later request is scored against.
        check_route_bounds(query, self._scheduler.workers)
        client = client_of(context.invocation_metadata(), context.peer())
        if self._queue is None:
            decision = self._scheduler.route(query)
        else:
            decision = await self._queue.route(query, context.time_remaining())
        if not query.dry_run:
            self.leases.routed(client, query.request_id)
        return router_pb2.RouteResponse(
            worker_id=decision.worker_id,
            dp_rank=decision.dp_rank,
            address=decision.address,
            overlap_blocks=decision.overlap_blocks,
            cached_tokens=decision.cached_tokens,
            block_size=decision.block_size,
            cost=decision.cost,
            mode=MODE_ENUMS[decision.mode],
            active_prefill_tokens=decision.active_prefill_tokens,
            active_decode_blocks=decision.active_decode_blocks,
            total_kv_blocks=decision.total_kv_blocks,
            max_num_batched_tokens=decision.max_num_batched_tokens,
        )

    async def NotifyFirstToken(
        self, request: router_pb2.NotifyFirstTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.NotifyFirstTokenResponse:
        self.leases.seen(client_of(context.invocation_metadata(), context.peer()))
        return router_pb2.NotifyFirstTokenResponse(applied=self._scheduler.first_token(request.request_id))

    async def NotifyFinished(
        self, request: router_pb2.NotifyFinishedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.NotifyFinishedResponse:
        outcome = _OUTCOMES.get(request.outcome)
        if outcome is None:
            raise InvalidArgument("outcome must be FINISHED, FAILED or CANCELLED")
        self.leases.seen(client_of(context.invocation_metadata(), context.peer()))
        self.leases.finished(request.request_id)
        return router_pb2.NotifyFinishedResponse(applied=self._scheduler.finish(request.request_id, outcome))

    async def StreamNotifications(
        self,
        request_iterator: AsyncIterable[router_pb2.StreamNotificationsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[router_pb2.StreamNotificationsResponse]:
        if self._closed:
            return
        progress = _Progress()
        self._streams.add(progress)
        client = client_of(context.invocation_metadata(), context.peer())
        self.leases.stream_opened(client)
        reader = asyncio.create_task(self._apply_notifications(request_iterator, progress))
        sent = 0
        try:
            while True:
                await progress.changed.wait()
                progress.changed.clear()
                if reader.done() or progress.closing:
                    # What the reader has not applied yet stays unacknowledged: the caller resends it.
                    reader.cancel()
                    if progress.handled > sent:
                        yield router_pb2.StreamNotificationsResponse(handled=progress.handled)
                    if reader.done() and not reader.cancelled():
                        reader.result()
                    return
                if progress.handled > sent:
                    sent = progress.handled
                    yield router_pb2.StreamNotificationsResponse(handled=sent)
                # Notifications arriving meanwhile share the next acknowledgement.
                await asyncio.sleep(ACK_INTERVAL_SECONDS)
        finally:
            self._streams.discard(progress)
            reader.cancel()
            # However it ended (to the server a vanished client looks like a half-close), unless
            # this router ended it: the client's remaining requests are released unless it opens a
            # new stream in time (a live client reopens one at once).
            self.leases.stream_closed(client, broken=not self._closed)

    def close(self) -> None:
        """End every notification stream after a last acknowledgement (shutdown): they never end
        on their own, and would otherwise hold the grace period open. Callers resend elsewhere what
        was not acknowledged."""
        self._closed = True
        self.leases.close()
        for progress in self._streams:
            progress.closing = True
            progress.changed.set()

    async def _apply_notifications(
        self, requests: AsyncIterable[router_pb2.StreamNotificationsRequest], progress: _Progress
    ) -> None:
        scheduler = self._scheduler
        try:
            async for request in requests:
                for note in request.notifications:
                    kind = note.WhichOneof("notification")
                    if kind == "first_token":
                        scheduler.first_token(note.first_token.request_id)
                    elif kind == "finished":
                        finished = note.finished
                        outcome = _OUTCOMES.get(finished.outcome)
                        if outcome is None:
                            raise InvalidArgument("outcome must be FINISHED, FAILED or CANCELLED")
                        scheduler.finish(finished.request_id, outcome)
                        self.leases.finished(finished.request_id)
                    else:
                        raise InvalidArgument("a notification must be first_token or finished")
                    progress.handled += 1
                progress.changed.set()
        finally:
            progress.changed.set()

    async def Dump(
        self, request: router_pb2.DumpRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[router_pb2.DumpResponse]:
        scheduler = self._scheduler
        model_workers: set[int] | None = None
        if request.model:
            model_workers = {
                w.worker_id for w in scheduler.workers.all() if _serves(w.instance, request.model)
            }
        only = request.worker_id if request.HasField("worker_id") else None
        for tier, index in sorted(scheduler.index.tiers.items()):
            for rank in sorted(index.ranks()):
                if only is not None and rank.worker_id != only:
                    continue
                if model_workers is not None and rank.worker_id not in model_workers:
                    continue
                next_id = self._next_event_id(rank) or 0
                batch: list[Chain] = []
                size = 0
                for chain in index.dump(rank):
                    batch.append(chain)
                    size += len(chain.block_hashes)
                    if size >= DUMP_BLOCKS_PER_MESSAGE:
                        yield _dump_message(rank, tier, batch, next_id)
                        batch, size = [], 0
                if batch:
                    yield _dump_message(rank, tier, batch, next_id)

    async def QueryOverlap(
        self, request: router_pb2.QueryOverlapRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.QueryOverlapResponse:
        scheduler = self._scheduler
        workers = [w for w in scheduler.workers.all() if _serves(w.instance, request.model)]
        wanted = {w.worker_id for w in workers}
        if request.worker_ids:
            wanted &= set(request.worker_ids)
        reply = router_pb2.QueryOverlapResponse(block_size=workers[0].block_size if workers else 0)
        if not request.block_hashes:
            return reply
        for tier, scores in sorted(scheduler.index.find_matches(Prompt(request.block_hashes)).items()):
            for rank, matched in sorted(scores.items()):
                if rank.worker_id in wanted and matched > 0:
                    reply.overlaps.add(
                        worker_id=rank.worker_id, dp_rank=rank.dp_rank, tier=int(tier), matched_blocks=matched
                    )
        return reply

    async def SubscribeReplicaEvents(
        self, request: router_pb2.SubscribeReplicaEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[router_pb2.SubscribeReplicaEventsResponse]:
        queue = self._hub.subscribe()
        log.info("router %s subscribed to replica events", request.router_id or "?")
        try:
            while (item := await queue.get()) is not None:
                yield replica_event_to_pb(item)
        finally:
            self._hub.unsubscribe(queue)


class _Progress:
    """A notification stream's count of handled notifications, and a signal when it moves."""

    __slots__ = ("changed", "closing", "handled")

    def __init__(self) -> None:
        self.handled = 0
        self.changed = asyncio.Event()
        self.closing = False


def _dump_message(rank: WorkerRank, tier: Tier, chains: list[Chain], next_id: int) -> router_pb2.DumpResponse:
    return router_pb2.DumpResponse(
        worker_id=rank.worker_id,
        dp_rank=rank.dp_rank,
        tier=int(tier),  # type: ignore[arg-type]
        chains=_chains_to_pb(chains),
        next_event_id=next_id,
    )


def _serves(instance: Any, model: str) -> bool:
    card = instance.model_card
    return card is not None and (not model or card.model == model)
