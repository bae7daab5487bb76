"""The simulated engine behind the :class:`~tokenyard.worker.engines.base.Engine` protocol.

A thin translation: the mocker keeps its own request and report types (it is also used on its own,
in benchmarks), and this adapter maps them to the worker's domain types and errors.

KV transfer is simulated, not carried: a prefill-role mocker returns transfer parameters naming
the prompt's blocks, and a decode-role mocker takes a request carrying them as if the prompt's KV
had arrived (it charges no prefill time and reports the prompt as cached). There are no KV bytes,
so exporting and importing blocks is not available.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing

from tokenyard.common.errors import AlreadyExists, InvalidArgument, Unavailable, Unimplemented
from tokenyard.common.hashing import block_hashes
from tokenyard.worker.engines.base import (
    EngineInfo,
    EngineRequest,
    FinishReason,
    GenerateChunk,
    KvBlockExport,
    KvSnapshot,
    KvTransferParams,
    RankLoad,
    StepListener,
    StepMetrics,
    StepRequests,
    Usage,
)
from tokenyard.worker.engines.mocker import request as mocker_request
from tokenyard.worker.engines.mocker.config import EngineRole, MockerConfig
from tokenyard.worker.engines.mocker.engine import EngineError, MockerEngine, StepReport
from tokenyard.worker.engines.mocker.perf_model import PerfModel
from tokenyard.worker.kv_events import KvEvent, KvEventListener

_FINISH = {
    mocker_request.FinishReason.STOP: FinishReason.STOP,
    mocker_request.FinishReason.LENGTH: FinishReason.LENGTH,
    mocker_request.FinishReason.CANCELLED: FinishReason.CANCELLED,
}
_NO_KV_BYTES = (
    "the mocker engine simulates KV transfer and holds no KV bytes to export or import; "
    "a decode mocker takes the prompt's KV as transferred"
)


class MockerAdapter:
    """:class:`~tokenyard.worker.engines.base.Engine` over :class:`~tokenyard.worker.engines.mocker.engine.MockerEngine`."""

    kind = "mocker"

    def __init__(
        self,
        config: MockerConfig | None = None,
        *,
        role: EngineRole = EngineRole.AGGREGATED,
        perf_model: PerfModel | None = None,
    ) -> None:
        self.config = config or MockerConfig()
        self.role = role
        self.mocker = MockerEngine(self.config, role=role, perf_model=perf_model)
        self._last_event_ids = [-1] * self.config.dp_size
        self.mocker.subscribe_kv_events(self._note_event)
        self._requests: set[str] = set()

    def _note_event(self, event: KvEvent) -> None:
        self._last_event_ids[event.dp_rank] = event.event_id

    def info(self) -> EngineInfo:
        cfg = self.config
        return EngineInfo(
            kind=self.kind,
            dp_size=cfg.dp_size,
            block_size=cfg.block_size,
            context_length=cfg.max_sequence_len,
            total_kv_blocks=cfg.num_gpu_blocks,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            eos_token_ids=() if cfg.eos_token_id is None else (cfg.eos_token_id,),
            publishes_kv_events=self.mocker.publishes_kv_events,
        )

    async def start(self) -> None:
        await self.mocker.start()

    async def stop(self) -> None:
        await self.mocker.stop()

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[GenerateChunk, None]:
        if request.request_id in self._requests:
            raise AlreadyExists(f"request {request.request_id!r} is already running on this worker")
        prompt_len = len(request.token_ids)
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.config.max_sequence_len - prompt_len)
        if request.prefill_only:
            max_tokens = 1
        try:
            simulated = mocker_request.MockerRequest(
                request_id=request.request_id,
                token_ids=request.token_ids,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                seed=request.sampling.seed,
                priority=request.priority,
                dp_rank=request.dp_rank,
                lora_name=request.lora_name or None,
                cache_salt=request.cache_salt or None,
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        self._requests.add(request.request_id)
        produced = 0
        try:
            async with aclosing(self.mocker.generate(simulated)) as chunks:
                try:
                    async for chunk in chunks:
                        produced += len(chunk.token_ids)
                        if chunk.finish_reason is None:
                            yield GenerateChunk(chunk.token_ids)
                            continue
                        yield self._last_chunk(request, chunk, _FINISH[chunk.finish_reason])
                        return
                except ValueError as exc:  # raised before the first chunk: the engine cannot take it
                    raise InvalidArgument(str(exc)) from None
                except EngineError as exc:
                    if produced == 0:
                        raise Unavailable(f"the mocker engine cannot serve requests: {exc}") from None
                    usage = Usage(prompt_len, produced, 0)
                    yield GenerateChunk((), FinishReason.ERROR, usage)
        finally:
            self._requests.discard(request.request_id)

    def _last_chunk(
        self, request: EngineRequest, chunk: mocker_request.TokenChunk, reason: FinishReason
    ) -> GenerateChunk:
        prompt_len = len(request.token_ids)
        usage = chunk.usage or mocker_request.Usage(prompt_len, len(chunk.token_ids), 0)
        cached = usage.cached_tokens
        if request.kv_transfer is not None:
            # The decode side computes none of what the prefill worker handed over.
            cached = max(cached, min(prompt_len, request.kv_transfer.num_tokens))
        transfer = None
        if request.prefill_only or self.role is EngineRole.PREFILL:
            _, hashes = block_hashes(
                request.token_ids,
                self.config.block_size,
                lora_name=request.lora_name,
                cache_salt=request.cache_salt,
            )
            transfer = KvTransferParams(
                source_worker_id=0,
                source_dp_rank=chunk.dp_rank,
                source_address="",
                transfer_id=request.request_id,
                block_hashes=tuple(hashes),
                num_tokens=prompt_len,
            )
        return GenerateChunk(
            chunk.token_ids,
            reason,
            Usage(usage.prompt_tokens, usage.completion_tokens, cached),
            kv_transfer=transfer,
        )

    def abort(self, request_id: str) -> bool:
        return self.mocker.abort(request_id)

    # -- observation ------------------------------------------------------------------------

    def load(self) -> tuple[RankLoad, ...]:
        now = time.time_ns()
        return tuple(
            RankLoad(
                dp_rank=r.dp_rank,
                active_blocks=r.active_blocks,
                total_blocks=r.total_blocks,
                waiting=r.waiting,
                running=r.running,
                active_prefill_tokens=r.active_prefill_tokens,
                timestamp_unix_ns=now,
            )
            for r in self.mocker.load()
        )

    def subscribe_kv_events(self, listener: KvEventListener) -> Callable[[], None]:
        return self.mocker.subscribe_kv_events(listener)

    def kv_snapshot(self, dp_rank: int) -> KvSnapshot:
        snapshot = self.mocker.kv_snapshot(dp_rank)
        return KvSnapshot(dp_rank, snapshot.last_event_id + 1, snapshot.events)

    def last_event_id(self, dp_rank: int) -> int:
        return self._last_event_ids[dp_rank]

    def subscribe_steps(self, listener: StepListener) -> Callable[[], None]:
        def on_step(report: StepReport) -> None:
            listener(self._step_metrics(report))

        return self.mocker.subscribe_steps(on_step)

    def _step_metrics(self, report: StepReport) -> StepMetrics:
        result = report.result
        # The mocker reports counts and sums only: variances and prefix KV are left at 0.
        pending_prefill = self.mocker.load()[report.dp_rank].active_prefill_tokens
        return StepMetrics(
            dp_rank=report.dp_rank,
            wall_time_s=report.duration_s,
            scheduled=StepRequests(
                num_prefill_requests=result.num_prefill_requests,
                sum_prefill_tokens=result.sum_prefill_tokens,
                num_decode_requests=result.num_decode_requests,
                sum_decode_kv_tokens=result.sum_decode_kv_tokens,
            ),
            queued=StepRequests(num_prefill_requests=result.num_waiting, sum_prefill_tokens=pending_prefill),
            timestamp_unix_ns=time.time_ns(),
        )

    # -- KV transfer ------------------------------------------------------------------------

    async def export_kv_blocks(self, transfer_id: str, block_hashes: Sequence[int]) -> KvBlockExport:
        raise Unimplemented(_NO_KV_BYTES)

    async def release_kv_transfer(self, transfer_id: str) -> None:
        """Nothing is held: the simulated transfer completed when the prefill request ended."""

    async def import_kv_blocks(self, params: KvTransferParams, blocks: KvBlockExport) -> None:
        raise Unimplemented(_NO_KV_BYTES)
