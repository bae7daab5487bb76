"""The batching engine shared by the engines Tokenyard schedules itself (mocker, CPU).

Each data-parallel rank has a :class:`~tokenyard.worker.engines.core.scheduler.Scheduler`, a
:class:`~tokenyard.worker.engines.core.block_pool.BlockPool`, a KV event publisher and a step
loop. The event loop owns every piece of state; a step is:

1. on the loop: schedule the step, allocate its blocks (evictions publish ``removed``);
2. in the executor: run it (a forward pass on a compute thread, or modelled time), which returns
   the sampled tokens;
3. on the loop: commit the completed blocks (``stored``), hand the tokens out, report the step.

Nothing allocates blocks while a step runs (imported KV enters the pool when its request is
admitted), and blocks of a request aborted meanwhile go back only after the step, so an executor
never writes a block that someone else owns. KV events are published on the loop before the
step's tokens, so a snapshot taken on the loop is always consistent with the events published so
far. Every role publishes them, decode included (the blocks it imported and the ones it
computed), so that a router can see what a decode worker holds; an engine without prefix caching
publishes none.

Requests for the prefill role (or marked ``prefill_only``) produce one token and end with the
transfer parameters a decode worker needs. With an executor that holds KV bytes the prompt's
blocks are held until fetched and released (or a timeout), and a request carrying transfer
parameters starts from the blocks the worker fetched and imported for it; the simulated engine
holds the blocks only while its modelled hand-off runs, and takes a request's transferred prompt as
if its KV had arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from tokenyard.common.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from tokenyard.worker.engines.base import (
    EngineInfo,
    EngineRequest,
    EngineRole,
    FinishReason,
    GenerateChunk,
    GuidedKind,
    KvBlockExport,
    KvBlockLayout,
    KvSnapshot,
    KvTransferParams,
    KvTransferStats,
    RankLoad,
    StepListener,
    StepMetrics,
    StepRequests,
    Usage,
)
from tokenyard.worker.engines.core.block_pool import Block, BlockPool, BlockTable
from tokenyard.worker.engines.core.executor import GuidedExecutor, KvBytes, StepExecutor
from tokenyard.worker.engines.core.scheduler import (
    PreemptionMode,
    Scheduled,
    Scheduler,
    SchedulerConfig,
    SequenceState,
    TokenOutput,
)
from tokenyard.worker.kv_events import KvCleared, KvEventListener, KvEventPublisher, KvStored

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What the batching core takes from an engine's settings."""

    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int | None = None
    """Longest sequence; None: what the executor reports (the model's, or the pool's)."""
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    preemption_mode: PreemptionMode = PreemptionMode.LIFO
    dp_size: int = 1
    kv_transfer_hold_s: float = 60.0
    """Seconds a prefill engine holds a prompt's blocks (and a decode engine fetched ones) for a
    transfer that nobody releases."""

    @classmethod
    def of(cls, settings: object) -> CoreConfig:
        """The core's part of an engine's settings: every field of this class that ``settings``
        has (by name); the others keep their defaults."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(settings, name) for name in names if hasattr(settings, name)})

    def scheduler_config(self, max_model_len: int, eos_token_ids: tuple[int, ...]) -> SchedulerConfig:
        """The scheduler of each rank, for sequences of at most ``max_model_len`` tokens."""
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=max_model_len,
            eos_token_ids=eos_token_ids,
            enable_chunked_prefill=self.enable_chunked_prefill,
            preemption_mode=self.preemption_mode,
        )


@dataclass(slots=True)
class _Stream:
    seq: SequenceState
    dp_rank: int
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    kv_transfer: KvTransferParams | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _HeldTransfer:
    """A prefill-only request's prompt blocks, kept until the decode worker has fetched them."""

    dp_rank: int
    table: BlockTable
    seq_hashes: tuple[int, ...]


class _Rank:
    def __init__(self, dp_rank: int, pool: BlockPool, scheduler: Scheduler, events: KvEventPublisher) -> None:
        self.dp_rank = dp_rank
        self.pool = pool
        self.scheduler = scheduler
        self.events = events
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class BatchingEngine:
    """:class:`~tokenyard.worker.engines.base.Engine` over a step executor (also a
    :class:`~tokenyard.worker.engines.base.StepMetricsSource` and a
    :class:`~tokenyard.worker.engines.base.GuidedDecoder`)."""

    def __init__(
        self,
        kind: str,
        executor: StepExecutor,
        config: CoreConfig,
        *,
        role: EngineRole = EngineRole.AGGREGATED,
    ) -> None:
        self.kind = kind
        self.executor = executor
        self.config = config
        self.role = EngineRole(role)
        self._publishers = [KvEventPublisher(r) for r in range(config.dp_size)]
        self._ranks: list[_Rank] = []
        self._streams: dict[str, _Stream] = {}
        self._step_listeners: list[StepListener] = []
        self._info: EngineInfo | None = None
        self._running = False
        self._failure: BaseException | None = None

    @property
    def publishes_kv_events(self) -> bool:
        """Whatever the role: a decode worker's cache (imported prompts, generated blocks) is what
        conditional disaggregation weighs against a remote prefill. Without prefix caching there is
        no cache to announce."""
        return self.config.enable_prefix_caching

    @property
    def holds_kv_bytes(self) -> bool:
        return isinstance(self.executor, KvBytes)

    @property
    def ranks(self) -> Sequence[_Rank]:
        return self._ranks

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        cfg = self.config
        spec = await self.executor.load()
        # A sequence never outgrows its rank's pool, so one request alone always fits.
        context = min(spec.context_length, spec.num_blocks * cfg.block_size)
        if cfg.max_model_len is not None:
            context = min(context, cfg.max_model_len)
        sched_config = cfg.scheduler_config(context, spec.eos_token_ids)
        executor = self.executor
        if self._ranks:
            # Started again after a stop: the new pools start empty, and routers must know.
            for publisher, rank in zip(self._publishers, self._ranks, strict=True):
                if rank.pool.sink is not None:
                    publisher.publish(KvCleared())
            self._ranks = []
        for dp_rank, publisher in enumerate(self._publishers):
            sink = publisher.publish if self.publishes_kv_events else None
            pool = BlockPool(
                spec.num_blocks, cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching, sink=sink
            )
            writer = None
            if isinstance(executor, KvBytes):
                writer = _writer(executor, dp_rank)
            executor.bind(dp_rank, pool)
            self._ranks.append(
                _Rank(
                    dp_rank,
                    pool,
                    Scheduler(pool, sched_config, kv_writer=writer, steps_write_kv=writer is not None),
                    publisher,
                )
            )
        self._info = EngineInfo(
            kind=self.kind,
            dp_size=cfg.dp_size,
            block_size=cfg.block_size,
            context_length=context,
            total_kv_blocks=spec.num_blocks,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            eos_token_ids=spec.eos_token_ids,
            publishes_kv_events=self.publishes_kv_events,
        )
        self._running = True
        for rank in self._ranks:
            rank.task = asyncio.create_task(self._run(rank), name=f"{self.kind}-rank-{rank.dp_rank}")
        log.info(
            "%s engine ready: %d rank(s) of %d KV blocks of %d tokens, context %d",
            self.kind,
            cfg.dp_size,
            spec.num_blocks,
            cfg.block_size,
            context,
        )

    async def stop(self) -> None:
        """Stop stepping; requests still in flight end with ``cancelled``."""
        self._running = False
        tasks = [rank.task for rank in self._ranks if rank.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The executor finishes a step still running (a forward pass writing KV) before any block
        # of it goes back.
        await self.executor.close()
        for rank in self._ranks:
            rank.task = None
            rank.scheduler.abandon_step()
        for request_id in list(self._streams):
            self.abort(request_id)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def info(self) -> EngineInfo:
        if self._info is None:
            raise Unavailable(f"the {self.kind} engine is not started")
        return self._info

    def guided_kinds(self) -> tuple[GuidedKind, ...]:
        return self.executor.guided_kinds() if isinstance(self.executor, GuidedExecutor) else ()

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[GenerateChunk, None]:
        if self._failure is not None:
            raise Unavailable(f"the {self.kind} engine failed: {self._failure}")
        if not self._running:
            raise Unavailable(f"the {self.kind} engine is not running")
        if request.request_id in self._streams:
            raise AlreadyExists(f"request {request.request_id!r} is already running on this worker")
        if request.prefill_only or self.role is EngineRole.PREFILL:
            request = dataclasses.replace(request, max_tokens=1, prefill_only=True)
        rank = self._pick_rank(request)
        try:
            sampler = self.executor.sampler(request)
            guide = None
            if request.guided is not None and isinstance(self.executor, GuidedExecutor):
                # Compiling a schema (up to the worker's 1 MiB limit) must not stall the loop.
                guide = await asyncio.to_thread(self.executor.guide, request)
            if request.request_id in self._streams:  # taken while the schema compiled
                raise AlreadyExists(f"request {request.request_id!r} is already running on this worker")
            seq = rank.scheduler.add(request, sampler)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        seq.guide = guide
        if request.kv_transfer is not None:
            seq.imported = self._imported(request.kv_transfer)
        stream = _Stream(seq, rank.dp_rank)
        self._streams[request.request_id] = stream
        rank.wake.set()
        produced = 0
        try:
            while True:
                await stream.ready.wait()
                stream.ready.clear()
                tokens, stream.tokens = tuple(stream.tokens), []
                produced += len(tokens)
                if stream.error is not None:
                    if produced == 0:
                        raise Unavailable(f"the {self.kind} engine failed: {stream.error}")
                    yield GenerateChunk(tokens, FinishReason.ERROR, self._usage(seq))
                    return
                if stream.finish_reason is None:
                    if tokens:
                        yield GenerateChunk(tokens)
                    continue
                if stream.finish_reason is not FinishReason.CANCELLED:
                    delay = self.executor.finish_delay_s(seq)
                    if delay > 0:
                        await asyncio.sleep(delay)
                queued = None if seq.scheduled_at is None else seq.scheduled_at - seq.accepted_at
                yield GenerateChunk(
                    tokens,
                    stream.finish_reason,
                    stream.usage or self._usage(seq),
                    queued_s=queued,
                    kv_transfer=stream.kv_transfer,
                )
                return
        finally:
            if self._streams.get(request.request_id) is stream:
                del self._streams[request.request_id]
                rank.scheduler.abort(request.request_id)

    def _pick_rank(self, request: EngineRequest) -> _Rank:
        if request.dp_rank is not None:
            if not 0 <= request.dp_rank < len(self._ranks):
                raise InvalidArgument(
                    f"dp_rank {request.dp_rank} out of range: the engine has {len(self._ranks)} ranks"
                )
            return self._ranks[request.dp_rank]
        if len(self._ranks) == 1:
            return self._ranks[0]
        return min(
            self._ranks,
            key=lambda r: (
                len(r.scheduler.waiting) + len(r.scheduler.running),
                r.pool.num_active_blocks,
                r.dp_rank,
            ),
        )

    def _usage(self, seq: SequenceState) -> Usage:
        usage = seq.usage()
        transfer = seq.request.kv_transfer
        if transfer is not None and not self.holds_kv_bytes:
            # Simulated transfer: the decode side computes none of what the prefill worker handed over.
            cached = max(usage.cached_tokens, min(usage.prompt_tokens, transfer.num_tokens))
            return Usage(usage.prompt_tokens, usage.completion_tokens, cached)
        return usage

    def abort(self, request_id: str) -> bool:
        """End a request now and free its blocks; its stream ends with ``cancelled``."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        if self._ranks:
            self._ranks[stream.dp_rank].scheduler.abort(request_id)
        stream.finish_reason = FinishReason.CANCELLED
        stream.usage = self._usage(stream.seq)
        stream.ready.set()
        return True

    # -- observation ------------------------------------------------------------------------

    def load(self) -> tuple[RankLoad, ...]:
        now = time.time_ns()
        if not self._ranks:
            return tuple(RankLoad(r, 0, 0, 0, 0, 0, now) for r in range(self.config.dp_size))
        return tuple(
            RankLoad(
                dp_rank=r.dp_rank,
                active_blocks=r.pool.num_active_blocks,
                total_blocks=r.pool.num_blocks,
                waiting=len(r.scheduler.waiting),
                running=len(r.scheduler.running),
                active_prefill_tokens=r.scheduler.active_prefill_tokens,
                timestamp_unix_ns=now,
            )
            for r in self._ranks
        )

    def subscribe_kv_events(self, listener: KvEventListener) -> Callable[[], None]:
        stops = [publisher.subscribe(listener) for publisher in self._publishers]

        def unsubscribe() -> None:
            for stop in stops:
                stop()

        return unsubscribe

    def kv_snapshot(self, dp_rank: int) -> KvSnapshot:
        if not 0 <= dp_rank < len(self._publishers):
            raise InvalidArgument(
                f"dp_rank {dp_rank} out of range: the engine has {len(self._publishers)} ranks"
            )
        publisher = self._publishers[dp_rank]
        chains: tuple[KvStored, ...] = ()
        if self._ranks and self.publishes_kv_events:
            chains = tuple(self._ranks[dp_rank].pool.snapshot())
        return KvSnapshot(dp_rank, publisher.last_event_id + 1, chains)

    def cached_block_hashes(self, dp_rank: int = 0) -> set[int]:
        """Sequence hashes of every block the rank's pool holds (what a router's index mirrors)."""
        return self._ranks[dp_rank].pool.cached_hashes() if self._ranks else set()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block on every rank (each publishes ``cleared``)."""
        for rank in self._ranks:
            rank.pool.reset()

    def subscribe_steps(self, listener: StepListener) -> Callable[[], None]:
        self._step_listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._step_listeners:
                self._step_listeners.remove(listener)

        return unsubscribe

    # -- KV transfer (shared by the simulated and the real engines) ---------------------------

    def _imported(self, params: KvTransferParams) -> dict[int, bytes] | None:
        """The prompt blocks a decode request starts from, by sequence hash: fetched bytes, or for
        an engine without KV bytes the transferred hashes alone (the simulated transfer)."""
        return dict.fromkeys(params.block_hashes, b"")

    # -- the step loop ----------------------------------------------------------------------

    async def _run(self, rank: _Rank) -> None:
        sched = rank.scheduler
        try:
            while True:
                if not sched.has_work:
                    self.executor.idle(rank.dp_rank)
                    rank.wake.clear()
                    await rank.wake.wait()
                    continue
                plan = sched.schedule()
                if not plan:
                    # Nothing fits now (cannot happen with a consistent pool); wait for a change.
                    sched.finish_step(plan, {})
                    rank.wake.clear()
                    await rank.wake.wait()
                    continue
                started = time.perf_counter()
                sampled = await self.executor.execute(rank.dp_rank, plan)
                wall = time.perf_counter() - started
                # Measured before finish_step appends the new tokens (which changes what `samples` says).
                metrics = self._step_metrics(rank, plan, wall) if self._step_listeners else None
                outputs = sched.finish_step(plan, sampled)
                self._deliver(rank, outputs)
                if metrics is not None:
                    for listener in tuple(self._step_listeners):
                        listener(metrics)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("the %s engine failed (rank %d)", self.kind, rank.dp_rank)
            self._failure = exc
            for stream in self._streams.values():
                if stream.dp_rank == rank.dp_rank:
                    stream.error = exc
                    stream.ready.set()

    def _deliver(self, rank: _Rank, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            seq = out.seq
            stream = self._streams.get(seq.request_id)
            if stream is None:  # aborted while the step was running
                if out.finish_reason is not None and seq.request.prefill_only:
                    rank.pool.release(seq.table)
                continue
            stream.tokens.append(out.token_id)
            if out.finish_reason is not None:
                stream.finish_reason = out.finish_reason
                stream.usage = self._usage(seq)
                if seq.request.prefill_only:
                    stream.kv_transfer = self._finish_prefill(rank, seq)
                # The request is done in the scheduler; the stream no longer owns anything to abort.
                del self._streams[seq.request_id]
            stream.ready.set()

    def _finish_prefill(self, rank: _Rank, seq: SequenceState) -> KvTransferParams:
        full = seq.prompt_len // self.config.block_size
        seq.hash_blocks(full)
        hashes = tuple(seq.seq_hashes[:full])
        self._hold(rank, seq, hashes)
        return KvTransferParams(
            source_worker_id=0,
            source_dp_rank=rank.dp_rank,
            source_address="",
            transfer_id=seq.request_id,
            block_hashes=hashes,
            num_tokens=seq.prompt_len,
        )

    def _hold(self, rank: _Rank, seq: SequenceState, hashes: tuple[int, ...]) -> None:
        """Without KV bytes nothing waits for a fetch: the blocks stay taken only while the
        modelled hand-off runs (the delay before the request's one token), then go back."""
        delay = self.executor.finish_delay_s(seq)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, rank.pool.release, seq.table)
        else:
            rank.pool.release(seq.table)

    def _step_metrics(self, rank: _Rank, plan: list[Scheduled], wall: float) -> StepMetrics:
        prefill = [w for w in plan if w.start < w.seq.prompt_len]
        decode = [w for w in plan if w.samples and w.start >= w.seq.prompt_len]
        prefill_lengths = [w.length for w in prefill]
        decode_kv = [w.start + w.length for w in decode]
        waiting = list(rank.scheduler.waiting)
        return StepMetrics(
            dp_rank=rank.dp_rank,
            wall_time_s=wall,
            scheduled=StepRequests(
                num_prefill_requests=len(prefill),
                sum_prefill_tokens=sum(prefill_lengths),
                var_prefill_length=_variance(prefill_lengths),
                sum_prefill_kv_tokens=sum(w.start for w in prefill),
                num_decode_requests=len(decode),
                sum_decode_kv_tokens=sum(decode_kv),
                var_decode_kv_tokens=_variance(decode_kv),
            ),
            queued=StepRequests(
                num_prefill_requests=len(waiting),
                sum_prefill_tokens=sum(s.prompt_len - s.num_computed for s in waiting),
            ),
            timestamp_unix_ns=time.time_ns(),
        )


def _variance(values: list[int]) -> float:
    """Population variance in floats: statistics.pvariance computes exactly in fractions, which
    cost more than the rest of a mocker step at speedup 0, every step."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return sum((v - mean) * (v - mean) for v in values) / n


def _writer(executor: KvBytes, dp_rank: int) -> Callable[[Block, bytes], None]:
    def write(block: Block, data: bytes) -> None:
        executor.write_block(dp_rank, block, data)

    return write


class KvTransferEngine(BatchingEngine):
    """A batching engine whose executor holds KV bytes: it also implements
    :class:`~tokenyard.worker.engines.base.KvBlockTransfer` (export after prefill, import before
    decode)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.executor, KvBytes):
            raise TypeError("a KV transfer engine needs an executor with KV bytes")
        self._kv: KvBytes = self.executor
        self._held: dict[str, _HeldTransfer] = {}
        self._imports: dict[str, KvBlockExport] = {}
        self._expired = 0

    async def stop(self) -> None:
        await super().stop()
        # Held tables belong to the pools of this run; a restarted engine starts with new ones.
        self._held.clear()
        self._imports.clear()

    def kv_layout(self) -> KvBlockLayout:
        if self._info is None:
            raise Unavailable(f"the {self.kind} engine is not started")
        return self._kv.kv_layout()

    def kv_block_bytes(self) -> int:
        return self._kv.block_bytes()

    def cached_kv_prefix(self, block_hashes: Sequence[int], dp_rank: int | None) -> int:
        if not self._ranks:
            return 0
        if dp_rank is None:
            if len(self._ranks) != 1:
                return 0  # the rank is picked at admission: assume nothing is cached
            dp_rank = 0
        if not 0 <= dp_rank < len(self._ranks):
            return 0
        return len(self._ranks[dp_rank].pool.match_prefix(block_hashes))

    def kv_transfer_stats(self) -> KvTransferStats:
        return KvTransferStats(
            held_transfers=len(self._held),
            held_blocks=sum(len(h.table.blocks) for h in self._held.values()),
            expired_transfers=self._expired,
        )

    def _imported(self, params: KvTransferParams) -> dict[int, bytes] | None:
        imported = self._imports.pop(params.transfer_id, None)
        return None if imported is None else dict(imported.blocks)

    def _hold(self, rank: _Rank, seq: SequenceState, hashes: tuple[int, ...]) -> None:
        previous = self._held.pop(seq.request_id, None)
        if previous is not None:
            self._ranks[previous.dp_rank].pool.release(previous.table)
        held = _HeldTransfer(rank.dp_rank, seq.table, hashes)
        self._held[seq.request_id] = held
        self._expire_later(seq.request_id, held)

    async def export_kv_blocks(self, transfer_id: str, block_hashes: Sequence[int]) -> KvBlockExport:
        held = self._held.get(transfer_id)
        if held is None:
            raise NotFound(
                f"no KV blocks are held for transfer {transfer_id!r}: unknown, already fetched and "
                f"released, or dropped after the {self.config.kv_transfer_hold_s:g}s hold timeout"
            )
        index = {h: i for i, h in enumerate(held.seq_hashes)}
        wanted = list(block_hashes) or list(held.seq_hashes)
        blocks: list[tuple[int, bytes]] = []
        for h in wanted:
            i = index.get(h)
            if i is None:
                raise NotFound(f"block {h:#018x} is not part of transfer {transfer_id!r}")
            blocks.append((h, self._kv.read_block(held.dp_rank, held.table.blocks[i])))
        return KvBlockExport(self.kv_layout(), tuple(blocks))

    async def release_kv_transfer(self, transfer_id: str) -> None:
        self._release_transfer(transfer_id)

    def _release_transfer(self, transfer_id: str) -> None:
        held = self._held.pop(transfer_id, None)
        if held is not None:
            self._ranks[held.dp_rank].pool.release(held.table)
        self._imports.pop(transfer_id, None)

    async def import_kv_blocks(self, params: KvTransferParams, blocks: KvBlockExport) -> None:
        """Keep the fetched blocks for the request that names ``params.transfer_id``; they enter
        the pool when it is admitted (its prompt gives the blocks' local hashes)."""
        layout = self.kv_layout()
        if blocks.layout != layout:
            raise InvalidArgument(f"KV layout {blocks.layout} does not match this engine's {layout}")
        expected = self._kv.block_bytes()
        named = set(params.block_hashes)
        for h, data in blocks.blocks:
            if h not in named:
                raise InvalidArgument(f"block {h:#018x} is not part of transfer {params.transfer_id!r}")
            if len(data) != expected:
                raise InvalidArgument(
                    f"block {h:#018x}: {len(data)} bytes, a {layout.block_size}-token block of this "
                    f"layout has {expected}"
                )
        self._imports[params.transfer_id] = blocks
        self._expire_later(params.transfer_id, blocks)

    def _expire_later(self, transfer_id: str, what: _HeldTransfer | KvBlockExport) -> None:
        """Let go of a transfer nobody released within the hold timeout (a decode worker that
        died, a fetch without ``release``), unless it was replaced or released meanwhile."""
        hold = self.config.kv_transfer_hold_s

        def expire() -> None:
            if self._held.get(transfer_id) is what:
                self._expired += 1
                log.info("KV transfer %r was not fetched within %gs; dropping its blocks", transfer_id, hold)
                self._release_transfer(transfer_id)
            elif self._imports.get(transfer_id) is what:
                log.info(
                    "KV blocks imported for %r were never used within %gs; dropping them", transfer_id, hold
                )
                del self._imports[transfer_id]

        asyncio.get_running_loop().call_later(hold, expire)


def batching_engine(
    kind: str, executor: StepExecutor, config: CoreConfig, *, role: EngineRole = EngineRole.AGGREGATED
) -> BatchingEngine:
    """The batching engine over ``executor``: with KV transfer when it holds KV bytes."""
    if isinstance(executor, KvBytes):
        return KvTransferEngine(kind, executor, config, role=role)
    return BatchingEngine(kind, executor, config, role=role)
