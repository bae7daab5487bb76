"""The CPU engine behind a worker: a real model, a paged prefix KV cache, continuous batching.

The engine's event loop owns every piece of state (the scheduler, the block tables, the cache's
index, the event stream); only the forward pass and the sampling after it run on a dedicated
compute thread, so the loop keeps serving gRPC while the model works. One step at a time:

1. on the loop: schedule the step, allocate its blocks, build the packed input tensors;
2. on the compute thread: run the model over the paged cache, sample the next tokens;
3. on the loop: commit the completed blocks (``stored`` events), hand the tokens out.

Nothing allocates blocks while a forward pass runs (allocation happens in step 1 only; imported
KV enters the cache when its request is admitted), and blocks of a request aborted meanwhile go
back only after the pass, so the compute thread never writes a block that someone else owns.

KV events are published on the loop, before the step's tokens, so a snapshot taken on the loop is
always consistent with the events published so far. A decode-role engine publishes none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import statistics
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import xxhash

from tokenyard.common.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from tokenyard.worker.config import WorkerRole
from tokenyard.worker.engines.base import (
    EngineInfo,
    EngineRequest,
    FinishReason,
    GenerateChunk,
    GuidedKind,
    KvBlockExport,
    KvBlockLayout,
    KvSnapshot,
    KvTransferParams,
    RankLoad,
    StepListener,
    StepMetrics,
    StepRequests,
    Usage,
)
from tokenyard.worker.engines.cpu import attention
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.guided import Guide, GuideFactory
from tokenyard.worker.engines.cpu.kv_cache import BlockTable, KvGeometry, PagedKvCache
from tokenyard.worker.engines.cpu.model import LoadedModel, ModelLoadError, load_model
from tokenyard.worker.engines.cpu.runner import ModelRunner
from tokenyard.worker.engines.cpu.sampling import Sampler
from tokenyard.worker.engines.cpu.scheduler import Scheduled, Scheduler, SequenceState, TokenOutput
from tokenyard.worker.kv_events import KvEventListener, KvEventPublisher

log = logging.getLogger(__name__)

KV_DTYPE = "float32"


def default_num_threads() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


@dataclass(slots=True)
class _Stream:
    seq: SequenceState
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    kv_transfer: KvTransferParams | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _HeldTransfer:
    """A prefill-only request's prompt blocks, kept until the decode worker has fetched them."""

    table: BlockTable
    seq_hashes: tuple[int, ...]


class CpuEngine:
    """:class:`~tokenyard.worker.engines.base.Engine` running a transformers model on the CPU."""

    kind = "cpu"

    def __init__(
        self,
        config: CpuEngineConfig | None = None,
        *,
        role: WorkerRole = WorkerRole.AGGREGATED,
        model: LoadedModel | None = None,
    ) -> None:
        """``model``: weights loaded already (by :func:`~tokenyard.worker.engines.cpu.model.load_model`);
        the engine switches it to paged attention, so it must not be shared with other users."""
        self.config = config or CpuEngineConfig()
        self.role = role
        self._loaded = model
        self._events = KvEventPublisher(0)
        self._streams: dict[str, _Stream] = {}
        self._step_listeners: list[StepListener] = []
        self._held: dict[str, _HeldTransfer] = {}
        self._imports: dict[str, KvBlockExport] = {}
        self._scheduler: Scheduler | None = None
        self._cache: PagedKvCache | None = None
        self._runner: ModelRunner | None = None
        self._info: EngineInfo | None = None
        self._layout: KvBlockLayout | None = None
        self._guides: GuideFactory | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = False
        self._failure: BaseException | None = None

    @property
    def publishes_kv_events(self) -> bool:
        """Decode workers keep no cache a router could use; without prefix caching there is none."""
        return self.role is not WorkerRole.DECODE and self.config.enable_prefix_caching

    @property
    def model(self) -> LoadedModel:
        if self._loaded is None:
            raise Unavailable("the CPU engine has not loaded its model yet")
        return self._loaded

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        cfg = self.config
        # Every torch op of the engine runs on this one thread (see _build).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenyard-cpu-engine")
        loop = asyncio.get_running_loop()
        try:
            cache = await loop.run_in_executor(self._executor, self._build)
        except ModelLoadError as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise Unavailable(str(exc)) from None
        assert self._loaded is not None
        g = self._loaded.geometry
        num_blocks = cache.num_blocks
        # A sequence never outgrows the pool, so one request alone always fits.
        context = min(cfg.max_model_len or g.max_position_embeddings, num_blocks * cfg.block_size)
        self._cache = cache
        self._scheduler = Scheduler(
            cache,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=context,
            eos_token_ids=self._loaded.eos_token_ids,
        )
        self._runner = ModelRunner(self._loaded.model, cache)
        layout_key = (
            f"{g.num_layers}/{g.num_kv_heads}/{g.head_dim}/{cfg.block_size}/{KV_DTYPE}/kv-layer-major"
        )
        self._layout = KvBlockLayout(
            num_layers=g.num_layers,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            block_size=cfg.block_size,
            dtype=KV_DTYPE,
            layout_hash=xxhash.xxh3_64_intdigest(layout_key.encode()),
        )
        self._info = EngineInfo(
            kind=self.kind,
            dp_size=1,
            block_size=cfg.block_size,
            context_length=context,
            total_kv_blocks=num_blocks,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            eos_token_ids=self._loaded.eos_token_ids,
            publishes_kv_events=self.publishes_kv_events,
        )
        self._running = True
        self._task = asyncio.create_task(self._run(), name="cpu-engine")
        log.info(
            "CPU engine ready: %d KV blocks of %d tokens, context %d, %d threads",
            num_blocks,
            cfg.block_size,
            context,
            torch.get_num_threads(),
        )

    def _build(self) -> PagedKvCache:
        """Load the model and allocate the KV pools, on the compute thread.

        PyTorch runs its intra-op parallelism on an OpenMP thread team per calling thread. Two
        threads that both run parallel ops means two teams on the same cores, whose idle workers
        then sleep instead of spinning, and a forward pass (hundreds of parallel regions) gets
        about 60% slower. So the model is loaded, the pools are zeroed, and every forward pass
        runs here; the event loop only touches torch for tiny tensors and numpy views.
        """
        cfg = self.config
        torch.set_num_threads(cfg.num_threads or default_num_threads())
        attention.register()
        if self._loaded is None:
            self._loaded = load_model(cfg, attn_implementation=attention.ATTN_IMPLEMENTATION)
        else:
            self._loaded.model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
        g = self._loaded.geometry
        self._guides = self._guide_factory(self._loaded)
        geometry = KvGeometry(g.num_layers, g.num_kv_heads, g.head_dim, cfg.block_size)
        num_blocks = cfg.num_kv_blocks or max(1, int(cfg.kv_cache_gib * (1 << 30)) // geometry.block_bytes)
        sink = self._events.publish if self.publishes_kv_events else None
        return PagedKvCache(num_blocks, geometry, enable_prefix_caching=cfg.enable_prefix_caching, sink=sink)

    @staticmethod
    def _guide_factory(loaded: LoadedModel) -> GuideFactory | None:
        """What guided decoding needs; None (no guided decoding) for a model without EOS or
        without a tokenizer file next to its weights."""
        path = loaded.weights_dir / "tokenizer.json"
        if not loaded.eos_token_ids or not path.is_file():
            return None
        return GuideFactory.load(path, loaded.geometry.vocab_size)

    async def stop(self) -> None:
        """Stop stepping; requests still in flight end with ``cancelled``."""
        self._running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._executor is not None:
            # Let a forward pass still running finish before anything is torn down.
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True)
        for request_id in list(self._streams):
            self.abort(request_id)

    async def __aenter__(self) -> CpuEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def guided_kinds(self) -> tuple[GuidedKind, ...]:
        return self._guides.kinds if self._guides is not None else ()

    def info(self) -> EngineInfo:
        if self._info is None:
            raise Unavailable("the CPU engine is not started")
        return self._info

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[GenerateChunk, None]:
        if self._failure is not None:
            raise Unavailable(f"the CPU engine failed: {self._failure}")
        if not self._running or self._scheduler is None:
            raise Unavailable("the CPU engine is not running")
        if request.request_id in self._streams:
            raise AlreadyExists(f"request {request.request_id!r} is already running on this worker")
        if request.prefill_only or self.role is WorkerRole.PREFILL:
            request = dataclasses.replace(request, max_tokens=1, prefill_only=True)
        try:
            sampler = Sampler.from_params(
                request.sampling, self.config.default_temperature, self.config.default_top_p
            )
            guide = self._guide(request)
            seq = self._scheduler.add(request, sampler)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        seq.guide = guide
        if request.kv_transfer is not None:
            imported = self._imports.pop(request.kv_transfer.transfer_id, None)
            if imported is not None:
                seq.imported = tuple(imported.blocks)
        stream = _Stream(seq)
        self._streams[request.request_id] = stream
        self._wake.set()
        produced = 0
        try:
            while True:
                await stream.ready.wait()
                stream.ready.clear()
                tokens, stream.tokens = tuple(stream.tokens), []
                produced += len(tokens)
                if stream.error is not None:
                    if produced == 0:
                        raise Unavailable(f"the CPU engine failed: {stream.error}")
                    yield GenerateChunk(tokens, FinishReason.ERROR, seq.usage())
                    return
                if stream.finish_reason is None:
                    if tokens:
                        yield GenerateChunk(tokens)
                    continue
                queued = None if seq.scheduled_at is None else seq.scheduled_at - seq.accepted_at
                yield GenerateChunk(
                    tokens,
                    stream.finish_reason,
                    stream.usage or seq.usage(),
                    queued_s=queued,
                    kv_transfer=stream.kv_transfer,
                )
                return
        finally:
            if self._streams.get(request.request_id) is stream:
                del self._streams[request.request_id]
                self._scheduler.abort(request.request_id)

    def _guide(self, request: EngineRequest) -> Guide | None:
        """The request's output constraint; ValueError for a schema the guide cannot compile."""
        if request.guided is None or self._guides is None or self._loaded is None:
            return None
        # Once the output is complete it ends: on the model's EOS or a stop token, whichever the
        # model prefers (a stop token is what ends a request that ignores EOS).
        ends = dict.fromkeys((*self._loaded.eos_token_ids, *sorted(request.stop_token_ids)))
        return self._guides.guide(request.guided, tuple(ends))

    def abort(self, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        if self._scheduler is not None:
            self._scheduler.abort(request_id)
        stream.finish_reason = FinishReason.CANCELLED
        stream.usage = stream.seq.usage()
        stream.ready.set()
        return True

    # -- observation ------------------------------------------------------------------------

    def load(self) -> tuple[RankLoad, ...]:
        now = time.time_ns()
        sched, cache = self._scheduler, self._cache
        if sched is None or cache is None:
            return (RankLoad(0, 0, 0, 0, 0, 0, now),)
        return (
            RankLoad(
                dp_rank=0,
                active_blocks=cache.num_active_blocks,
                total_blocks=cache.num_blocks,
                waiting=len(sched.waiting),
                running=len(sched.running),
                active_prefill_tokens=sched.active_prefill_tokens,
                timestamp_unix_ns=now,
            ),
        )

    def subscribe_kv_events(self, listener: KvEventListener) -> Callable[[], None]:
        return self._events.subscribe(listener)

    def kv_snapshot(self, dp_rank: int) -> KvSnapshot:
        if dp_rank != 0:
            raise InvalidArgument(f"dp_rank {dp_rank} out of range: the engine has 1 rank")
        chains = tuple(self._cache.snapshot()) if self._cache is not None and self.publishes_kv_events else ()
        return KvSnapshot(0, self._events.last_event_id + 1, chains)

    def last_event_id(self, dp_rank: int) -> int:
        return self._events.last_event_id

    def cached_block_hashes(self) -> set[int]:
        """Sequence hashes of every block the cache holds (what a router's index should mirror)."""
        return self._cache.cached_hashes() if self._cache is not None else set()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (publishes ``cleared``)."""
        if self._cache is not None:
            self._cache.reset()

    def subscribe_steps(self, listener: StepListener) -> Callable[[], None]:
        self._step_listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._step_listeners:
                self._step_listeners.remove(listener)

        return unsubscribe

    # -- KV transfer ------------------------------------------------------------------------

    def kv_layout(self) -> KvBlockLayout:
        if self._layout is None:
            raise Unavailable("the CPU engine is not started")
        return self._layout

    async def export_kv_blocks(self, transfer_id: str, block_hashes: Sequence[int]) -> KvBlockExport:
        held = self._held.get(transfer_id)
        if held is None or self._cache is None:
            raise NotFound(f"no KV blocks are held for transfer {transfer_id!r}")
        index = {h: i for i, h in enumerate(held.seq_hashes)}
        wanted = list(block_hashes) or list(held.seq_hashes)
        blocks: list[tuple[int, bytes]] = []
        for h in wanted:
            i = index.get(h)
            if i is None:
                raise NotFound(f"block {h:#018x} is not part of transfer {transfer_id!r}")
            blocks.append((h, self._cache.read_block(held.table.blocks[i])))
        return KvBlockExport(self.kv_layout(), tuple(blocks))

    async def release_kv_transfer(self, transfer_id: str) -> None:
        self._release_transfer(transfer_id)

    def _release_transfer(self, transfer_id: str) -> None:
        held = self._held.pop(transfer_id, None)
        if held is not None and self._cache is not None:
            self._cache.release(held.table)
        self._imports.pop(transfer_id, None)

    async def import_kv_blocks(self, params: KvTransferParams, blocks: KvBlockExport) -> None:
        """Keep the fetched blocks for the request that names ``params.transfer_id``; they enter
        the cache when it is admitted (its prompt gives the blocks' local hashes)."""
        if blocks.layout != self.kv_layout():
            raise InvalidArgument(
                f"KV layout {blocks.layout} does not match this engine's {self.kv_layout()}"
            )
        expected = self.kv_layout().block_size
        geometry_bytes = self._cache.geometry.block_bytes if self._cache is not None else 0
        for h, data in blocks.blocks:
            if len(data) != geometry_bytes:
                raise InvalidArgument(
                    f"block {h:#018x}: {len(data)} bytes, a {expected}-token block of this layout has {geometry_bytes}"
                )
        self._imports[params.transfer_id] = blocks
        self._expire_later(params.transfer_id, blocks)

    # -- the step loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        sched, runner = self._scheduler, self._runner
        assert sched is not None and runner is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not sched.has_work:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                plan = sched.schedule()
                if not plan:
                    # Nothing fits now (cannot happen with a consistent pool); wait for a change.
                    sched.finish_step(plan, {})
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                started = time.perf_counter()
                sampled = await loop.run_in_executor(self._executor, runner.step, plan)
                wall = time.perf_counter() - started
                # Measured before finish_step appends the new tokens (which changes what `samples` says).
                metrics = self._step_metrics(plan, wall) if self._step_listeners else None
                outputs = sched.finish_step(plan, sampled)
                self._deliver(outputs)
                if metrics is not None:
                    for listener in tuple(self._step_listeners):
                        listener(metrics)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("the CPU engine failed")
            self._failure = exc
            for stream in self._streams.values():
                stream.error = exc
                stream.ready.set()

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            seq = out.seq
            stream = self._streams.get(seq.request_id)
            if stream is None:  # aborted while the step was running
                continue
            stream.tokens.append(out.token_id)
            if out.finish_reason is not None:
                stream.finish_reason = out.finish_reason
                stream.usage = seq.usage()
                if seq.request.prefill_only:
                    stream.kv_transfer = self._hold_for_transfer(seq)
                # The request is done in the scheduler; the stream no longer owns anything to abort.
                del self._streams[seq.request_id]
            stream.ready.set()

    def _hold_for_transfer(self, seq: SequenceState) -> KvTransferParams:
        full = seq.prompt_len // self.config.block_size
        seq.hash_blocks(full)
        hashes = tuple(seq.seq_hashes[:full])
        previous = self._held.pop(seq.request_id, None)
        if previous is not None and self._cache is not None:
            self._cache.release(previous.table)
        held = _HeldTransfer(seq.table, hashes)
        self._held[seq.request_id] = held
        self._expire_later(seq.request_id, held)
        return KvTransferParams(
            source_worker_id=0,
            source_dp_rank=0,
            source_address="",
            transfer_id=seq.request_id,
            block_hashes=hashes,
            num_tokens=seq.prompt_len,
        )

    def _expire_later(self, transfer_id: str, what: _HeldTransfer | KvBlockExport) -> None:
        """Let go of a transfer nobody released within the hold timeout (a decode worker that
        died, a fetch without ``release``), unless it was replaced or released meanwhile."""

        def expire() -> None:
            if self._held.get(transfer_id) is what or self._imports.get(transfer_id) is what:
                log.info("KV transfer %r was not released within %.0fs; dropping it", transfer_id, hold)
                self._release_transfer(transfer_id)

        hold = self.config.kv_transfer_hold_s
        asyncio.get_running_loop().call_later(hold, expire)

    def _step_metrics(self, plan: list[Scheduled], wall: float) -> StepMetrics:
        assert self._scheduler is not None
        prefill = [w for w in plan if w.start < w.seq.prompt_len]
        decode = [w for w in plan if w.samples and w.start >= w.seq.prompt_len]
        prefill_lengths = [w.length for w in prefill]
        decode_kv = [w.start + w.length for w in decode]
        waiting = list(self._scheduler.waiting)
        return StepMetrics(
            dp_rank=0,
            wall_time_s=wall,
            scheduled=StepRequests(
                num_prefill_requests=len(prefill),
                sum_prefill_tokens=sum(prefill_lengths),
                var_prefill_length=statistics.pvariance(prefill_lengths) if prefill_lengths else 0.0,
                sum_prefill_kv_tokens=sum(w.start for w in prefill),
                num_decode_requests=len(decode),
                sum_decode_kv_tokens=sum(decode_kv),
                var_decode_kv_tokens=statistics.pvariance(decode_kv) if decode_kv else 0.0,
            ),
            queued=StepRequests(
                num_prefill_requests=len(waiting),
                sum_prefill_tokens=sum(s.prompt_len - s.num_computed for s in waiting),
            ),
            timestamp_unix_ns=time.time_ns(),
        )
