"""RouterService: proto in → routing domain → proto out, nothing else."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from tokenyard.common.errors import InvalidArgument
from tokenyard.router.active import Outcome
from tokenyard.router.index import Chain, Prompt, WorkerRank
from tokenyard.router.replicas import FirstToken, ReplicaEvent, ReplicaHub, Routed
from tokenyard.router.scheduler import RouteHints, RouteQuery, Scheduler
from tokenyard.router.tiers import Tier
from tokenyard.router.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name

MODE_NAMES = {
    router_pb2.ROUTING_MODE_KV: "kv",
    router_pb2.ROUTING_MODE_ROUND_ROBIN: "round-robin",
    router_pb2.ROUTING_MODE_RANDOM: "random",
    router_pb2.ROUTING_MODE_POWER_OF_TWO: "power-of-two",
    router_pb2.ROUTING_MODE_LEAST_LOADED: "least-loaded",
    router_pb2.ROUTING_MODE_DIRECT: "direct",
}
MODE_ENUMS = {name: value for value, name in MODE_NAMES.items()}
_POOLS = {
    router_pb2.WORKER_POOL_UNSPECIFIED: "",
    router_pb2.WORKER_POOL_AGGREGATED: "aggregated",
    router_pb2.WORKER_POOL_PREFILL: "prefill",
    router_pb2.WORKER_POOL_DECODE: "decode",
}
_OUTCOMES = {
    router_pb2.REQUEST_OUTCOME_FINISHED: Outcome.FINISHED,
    router_pb2.REQUEST_OUTCOME_FAILED: Outcome.FAILED,
    router_pb2.REQUEST_OUTCOME_CANCELLED: Outcome.CANCELLED,
}
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
        self, scheduler: Scheduler, hub: ReplicaHub, next_event_id: NextEventId | None = None
    ) -> None:
        self._scheduler = scheduler
        self._hub = hub
        self._next_event_id = next_event_id or (lambda rank: None)

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.RouteResponse:
        pool = _POOLS.get(request.pool)
        if pool is None:
            raise InvalidArgument(f"unknown worker pool {request.pool}")
        decision = self._scheduler.route(
            RouteQuery(
                request_id=request.request_id,
                model=request.model,
                local_hashes=request.block_hashes,
                isl_tokens=request.isl_tokens,
                sequence_hashes=request.sequence_hashes or None,
                pool=pool,
                hints=hints_from_pb(request.hints),
                dry_run=request.dry_run,
            )
        )
        return router_pb2.RouteResponse(
            worker_id=decision.worker_id,
            dp_rank=decision.dp_rank,
            address=decision.address,
            overlap_blocks=decision.overlap_blocks,
            cached_tokens=decision.cached_tokens,
            block_size=decision.block_size,
            cost=decision.cost,
            mode=MODE_ENUMS[decision.mode],
        )

    async def NotifyFirstToken(
        self, request: router_pb2.NotifyFirstTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.NotifyFirstTokenResponse:
        return router_pb2.NotifyFirstTokenResponse(applied=self._scheduler.first_token(request.request_id))

    async def NotifyFinished(
        self, request: router_pb2.NotifyFinishedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.NotifyFinishedResponse:
        outcome = _OUTCOMES.get(request.outcome)
        if outcome is None:
            raise InvalidArgument("outcome must be FINISHED, FAILED or CANCELLED")
        return router_pb2.NotifyFinishedResponse(applied=self._scheduler.finish(request.request_id, outcome))

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
