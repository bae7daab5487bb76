"""WorkerService: proto in → worker domain → proto out, nothing else."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import grpc

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.errors import InvalidArgument, Unimplemented
from tokenyard.worker.description import WorkerDescription
from tokenyard.worker.engines.base import (
    Engine,
    EngineRequest,
    FinishReason,
    GuidedDecoding,
    GuidedKind,
    KvBlockExport,
    KvBlockTransfer,
    KvSnapshot,
    KvTransferParams,
    RankLoad,
    SamplingParams,
    StepRequests,
)
from tokenyard.worker.forward_pass import ForwardPassHub
from tokenyard.worker.intake import Intake, Output
from tokenyard.worker.kv_events import KvCleared, KvEvent, KvRemoved, KvStored
from tokenyard.worker.kv_stream import KvEventBatch, KvEventHub, KvStreamItem
from tokenyard.worker.metrics import WorkerMetrics
from tokenyard.worker.mux import MuxSession

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name

# Keep each stream message far below the 64 MiB limit, whatever the prompt lengths.
_EVENTS_PER_MESSAGE = 256
_BLOCKS_PER_SNAPSHOT_PART = 8192
KV_EVENTS_INTERVAL_S = 0.005
"""The shortest time between two event messages of a KV event stream (loads and snapshots are not
held back)."""
KV_PART_BYTES = 1024 * 1024
"""FetchKvBlocks sends a block larger than this in parts of this size (read when a fetch begins)."""

_FINISH = {
    FinishReason.STOP: worker_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: worker_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: worker_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: worker_pb2.FINISH_REASON_ERROR,
}
_GUIDED_KINDS = {
    worker_pb2.GUIDED_DECODING_KIND_JSON_OBJECT: GuidedKind.JSON_OBJECT,
    worker_pb2.GUIDED_DECODING_KIND_JSON_SCHEMA: GuidedKind.JSON_SCHEMA,
}
_ROLES = {
    "aggregated": worker_pb2.WORKER_ROLE_AGGREGATED,
    "prefill": worker_pb2.WORKER_ROLE_PREFILL,
    "decode": worker_pb2.WORKER_ROLE_DECODE,
}

Context = grpc.aio.ServicerContext[Any, Any]


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        *,
        engine: Engine,
        intake: Intake,
        kv_events: KvEventHub,
        forward_passes: ForwardPassHub,
        description: WorkerDescription,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._engine = engine
        self._intake = intake
        self._kv_events = kv_events
        self._forward_passes = forward_passes
        self._description = description
        self._metrics = metrics
        self._mux_sessions: set[MuxSession] = set()
        self._closing = False

    def close(self) -> None:
        """The worker shuts down: GenerateMux calls end once their streams did (they would
        otherwise hold the grace period open)."""
        self._closing = True
        for session in self._mux_sessions:
            session.close()

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        async with aclosing(self._intake.generate(request.model, _engine_request(request))) as outputs:
            async for output in outputs:
                yield _generate_response(output)

    async def GenerateMux(
        self, request_iterator: AsyncIterator[worker_pb2.GenerateMuxRequest], context: Context
    ) -> AsyncIterator[worker_pb2.GenerateMuxResponse]:
        session = MuxSession(self._intake, _engine_request, _generate_response)
        if self._closing:
            session.close()
        self._mux_sessions.add(session)
        try:
            async with aclosing(session.run(request_iterator)) as batches:
                async for batch in batches:
                    yield batch
        finally:
            self._mux_sessions.discard(session)

    async def SubscribeKvEvents(
        self, request: worker_pb2.SubscribeKvEventsRequest, context: Context
    ) -> AsyncIterator[worker_pb2.SubscribeKvEventsResponse]:
        dp_rank = request.dp_rank if request.HasField("dp_rank") else None
        subscription = self._kv_events.subscribe(dp_rank, dict(request.resume_from_event_id))
        loop = asyncio.get_running_loop()
        sent_events_at = -math.inf
        async with aclosing(subscription.items()) as items:
            while True:
                # Events of the steps that follow within the interval wait and leave together: an
                # engine that steps every fraction of a millisecond (the mocker at speedup 0) would
                # otherwise cost this worker and every router a message per step.
                rest = sent_events_at + KV_EVENTS_INTERVAL_S - loop.time()
                if rest > 0:
                    await asyncio.sleep(rest)
                item = await anext(items, None)
                if item is None:
                    return
                if isinstance(item, KvEventBatch):
                    sent_events_at = loop.time()
                for message in _kv_stream_messages(item):
                    yield message

    async def SubscribeForwardPassMetrics(
        self, request: worker_pb2.SubscribeForwardPassMetricsRequest, context: Context
    ) -> AsyncIterator[worker_pb2.SubscribeForwardPassMetricsResponse]:
        dp_rank = request.dp_rank if request.HasField("dp_rank") else None
        subscription = self._forward_passes.subscribe(dp_rank)
        async with aclosing(subscription.samples()) as samples:
            async for sample in samples:
                m = sample.metrics
                yield worker_pb2.SubscribeForwardPassMetricsResponse(
                    dp_rank=m.dp_rank,
                    step_id=sample.step_id,
                    wall_time_ms=m.wall_time_s * 1000.0,
                    scheduled=_step_requests(m.scheduled),
                    queued=_step_requests(m.queued),
                    timestamp_unix_ns=m.timestamp_unix_ns,
                )

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: Context
    ) -> worker_pb2.GetLoadResponse:
        loads = self._engine.load()
        if request.HasField("dp_rank"):
            if request.dp_rank >= len(loads):
                raise InvalidArgument(
                    f"dp_rank {request.dp_rank} out of range: this worker has ranks 0..{len(loads) - 1}"
                )
            loads = tuple(load for load in loads if load.dp_rank == request.dp_rank)
        return worker_pb2.GetLoadResponse(ranks=[_load(load) for load in loads])

    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: Context
    ) -> worker_pb2.DescribeResponse:
        d = self._description
        info = d.engine
        return worker_pb2.DescribeResponse(
            worker_id=d.worker_id,
            role=_ROLES[d.role],
            model_card=worker_pb2.ModelCard(
                name=d.model,
                tokenizer=d.tokenizer,
                kv_cache_block_size=info.block_size,
                context_length=info.context_length,
                total_kv_blocks=info.total_kv_blocks,
                max_num_seqs=info.max_num_seqs,
                max_num_batched_tokens=info.max_num_batched_tokens,
                eos_token_ids=info.eos_token_ids,
            ),
            dp_size=info.dp_size,
            engine=info.kind,
            draining=self._intake.draining,
            publishes_kv_events=info.publishes_kv_events,
        )

    async def FetchKvBlocks(
        self, request: worker_pb2.FetchKvBlocksRequest, context: Context
    ) -> AsyncIterator[worker_pb2.FetchKvBlocksResponse]:
        engine = self._engine
        if not isinstance(engine, KvBlockTransfer):
            raise Unimplemented(
                f"the {engine.info().kind} engine holds no KV bytes to export (its KV transfer is "
                "simulated: a decode worker takes the prompt's KV as transferred)"
            )
        if not request.transfer_id:
            raise InvalidArgument("transfer_id must be set")
        started = time.perf_counter()
        export = await engine.export_kv_blocks(request.transfer_id, tuple(request.block_hashes))
        nbytes = 0
        for index, (block_hash, data) in enumerate(export.blocks):
            for message in _block_messages(index, block_hash, data, KV_PART_BYTES):
                if index == 0 and message.offset == 0:
                    message.layout.CopyFrom(_layout(export))
                yield message
            nbytes += len(data)
        if request.release:
            await engine.release_kv_transfer(request.transfer_id)
        if self._metrics is not None:
            self._metrics.observe_transfer(
                "sent", blocks=len(export.blocks), nbytes=nbytes, seconds=time.perf_counter() - started
            )

    async def Drain(self, request: worker_pb2.DrainRequest, context: Context) -> worker_pb2.DrainResponse:
        grace = request.grace_period_ms / 1000.0 if request.grace_period_ms else None
        result = await self._intake.drain(grace, wait=request.wait)
        return worker_pb2.DrainResponse(
            in_flight_requests=result.in_flight_requests,
            cancelled_requests=result.cancelled_requests,
            already_draining=result.already_draining,
        )


# -- proto → domain ------------------------------------------------------------------------


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _engine_request(request: worker_pb2.GenerateRequest) -> EngineRequest:
    s = request.sampling
    stop = request.stop
    disagg = request.disaggregation
    transfer = None
    if disagg.HasField("kv_transfer"):
        t = disagg.kv_transfer
        transfer = KvTransferParams(
            source_worker_id=t.source_worker_id,
            source_dp_rank=t.source_dp_rank,
            source_address=t.source_address,
            transfer_id=t.transfer_id,
            block_hashes=tuple(t.block_hashes),
            num_tokens=t.num_tokens,
            engine_params=t.engine_params,
        )
    guided = None
    if request.HasField("guided_decoding"):
        g = request.guided_decoding
        kind = _GUIDED_KINDS.get(g.kind)
        if kind is None:
            raise InvalidArgument("guided_decoding.kind must be set")
        if (kind is GuidedKind.JSON_SCHEMA) != bool(g.json_schema):
            raise InvalidArgument("guided_decoding.json_schema must be set exactly when kind is JSON_SCHEMA")
        guided = GuidedDecoding(kind, g.json_schema)
    return EngineRequest(
        request_id=request.request_id,
        token_ids=tuple(request.token_ids),
        max_tokens=_optional(stop, "max_tokens"),
        min_tokens=stop.min_tokens,
        stop_token_ids=frozenset(stop.stop_token_ids),
        ignore_eos=stop.ignore_eos,
        sampling=SamplingParams(
            temperature=_optional(s, "temperature"),
            top_p=_optional(s, "top_p"),
            top_k=_optional(s, "top_k"),
            min_p=_optional(s, "min_p"),
            seed=_optional(s, "seed"),
            repetition_penalty=_optional(s, "repetition_penalty"),
            frequency_penalty=_optional(s, "frequency_penalty"),
            presence_penalty=_optional(s, "presence_penalty"),
        ),
        priority=request.priority,
        dp_rank=_optional(request, "dp_rank"),
        lora_name=request.lora_name,
        cache_salt=request.cache_salt,
        prefill_only=disagg.prefill_only,
        kv_transfer=transfer,
        annotations=dict(request.annotations),
        guided=guided,
    )


# -- domain → proto ------------------------------------------------------------------------


def _generate_response(output: Output) -> worker_pb2.GenerateResponse:
    response = worker_pb2.GenerateResponse(token_ids=output.token_ids)
    done = output.completion
    if done is None:
        return response
    response.finish_reason = _FINISH[done.finish_reason]
    response.usage.CopyFrom(
        worker_pb2.Usage(
            prompt_tokens=done.usage.prompt_tokens,
            completion_tokens=done.usage.completion_tokens,
            cached_tokens=done.usage.cached_tokens,
        )
    )
    t = done.timings
    response.timings.CopyFrom(
        worker_pb2.RequestTimings(
            queued_ms=(t.queued_s or 0.0) * 1000.0,
            first_token_ms=(t.first_token_s or 0.0) * 1000.0,
            total_ms=t.total_s * 1000.0,
        )
    )
    if done.kv_transfer is not None:
        k = done.kv_transfer
        response.kv_transfer.CopyFrom(
            worker_pb2.KvTransferParams(
                source_worker_id=k.source_worker_id,
                source_dp_rank=k.source_dp_rank,
                source_address=k.source_address,
                transfer_id=k.transfer_id,
                block_hashes=k.block_hashes,
                num_tokens=k.num_tokens,
                engine_params=k.engine_params,
            )
        )
    return response


def _layout(export: KvBlockExport) -> worker_pb2.KvBlockLayout:
    layout = export.layout
    return worker_pb2.KvBlockLayout(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
        dtype=layout.dtype,
        layout_hash=layout.layout_hash,
    )


def _block_messages(
    index: int, block_hash: int, data: bytes, part_bytes: int
) -> Iterator[worker_pb2.FetchKvBlocksResponse]:
    """One message for a block of at most ``part_bytes``, else its parts in order."""
    if len(data) <= part_bytes:
        yield worker_pb2.FetchKvBlocksResponse(block_index=index, block_hash=block_hash, data=data)
        return
    for offset in range(0, len(data), part_bytes):
        yield worker_pb2.FetchKvBlocksResponse(
            block_index=index,
            block_hash=block_hash,
            data=data[offset : offset + part_bytes],
            offset=offset,
            block_bytes=len(data),
        )


def _stored(stored: KvStored) -> worker_pb2.KvStored:
    message = worker_pb2.KvStored(
        blocks=[worker_pb2.KvBlock(block_hash=b.block_hash, tokens_hash=b.tokens_hash) for b in stored.blocks]
    )
    if stored.parent_hash is not None:
        message.parent_hash = stored.parent_hash
    if stored.start_position is not None:
        message.start_position = stored.start_position
    return message


def _event(event: KvEvent) -> worker_pb2.KvEvent:
    message = worker_pb2.KvEvent(
        event_id=event.event_id, dp_rank=event.dp_rank, tier=worker_pb2.STORAGE_TIER_DEVICE
    )
    data = event.data
    if isinstance(data, KvStored):
        message.stored.CopyFrom(_stored(data))
    elif isinstance(data, KvRemoved):
        message.removed.block_hashes.extend(data.block_hashes)
    elif isinstance(data, KvCleared):
        message.cleared.SetInParent()
    return message


def _snapshot_parts(snapshot: KvSnapshot) -> Iterator[worker_pb2.KvSnapshot]:
    parts: list[list[KvStored]] = [[]]
    blocks = 0
    for chain in snapshot.chains:
        if parts[-1] and blocks + len(chain.blocks) > _BLOCKS_PER_SNAPSHOT_PART:
            parts.append([])
            blocks = 0
        parts[-1].append(chain)
        blocks += len(chain.blocks)
    for i, chains in enumerate(parts):
        yield worker_pb2.KvSnapshot(
            dp_rank=snapshot.dp_rank,
            next_event_id=snapshot.next_event_id,
            chains=[
                worker_pb2.KvSnapshotChain(tier=worker_pb2.STORAGE_TIER_DEVICE, stored=_stored(c))
                for c in chains
            ],
            has_more=i < len(parts) - 1,
        )


def _load(load: RankLoad) -> worker_pb2.LoadSnapshot:
    return worker_pb2.LoadSnapshot(
        dp_rank=load.dp_rank,
        active_blocks=load.active_blocks,
        total_blocks=load.total_blocks,
        waiting_requests=load.waiting,
        running_requests=load.running,
        active_prefill_tokens=load.active_prefill_tokens,
        timestamp_unix_ns=load.timestamp_unix_ns,
    )


def _kv_stream_messages(item: KvStreamItem) -> Iterator[worker_pb2.SubscribeKvEventsResponse]:
    if isinstance(item, KvEventBatch):
        events = item.events
        for start in range(0, len(events), _EVENTS_PER_MESSAGE):
            batch = worker_pb2.KvEventBatch(
                events=[_event(e) for e in events[start : start + _EVENTS_PER_MESSAGE]]
            )
            yield worker_pb2.SubscribeKvEventsResponse(events=batch)
    elif isinstance(item, KvSnapshot):
        for part in _snapshot_parts(item):
            yield worker_pb2.SubscribeKvEventsResponse(snapshot=part)
    else:
        yield worker_pb2.SubscribeKvEventsResponse(load=_load(item))


def _step_requests(r: StepRequests) -> worker_pb2.StepRequests:
    return worker_pb2.StepRequests(
        num_prefill_requests=r.num_prefill_requests,
        sum_prefill_tokens=r.sum_prefill_tokens,
        var_prefill_length=r.var_prefill_length,
        sum_prefill_kv_tokens=r.sum_prefill_kv_tokens,
        num_decode_requests=r.num_decode_requests,
        sum_decode_kv_tokens=r.sum_decode_kv_tokens,
        var_decode_kv_tokens=r.var_decode_kv_tokens,
    )
