"""The simulated engine behind a worker: data-parallel ranks stepping in real (or scaled) time.

Each rank runs its own :class:`~tokenyard.worker.engines.mocker.scheduler.Scheduler` in a background
task. A step's state change happens at once; then the task sleeps for the step's modelled
duration and hands the step's tokens out. Step deadlines are chained (the next step starts when
the previous one was due, not when the sleep happened to return), so the timer's overshoot does
not accumulate into the inter-token latency. With ``speedup_ratio == 0`` nothing sleeps, but
the task still yields to the event loop between steps.

KV events are numbered per rank as the steps produce them and handed to subscribers at once,
before the step's tokens; a decode-role engine publishes none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from tokenyard.worker.engines.mocker.config import EngineRole, MockerConfig
from tokenyard.worker.engines.mocker.perf_model import PerfModel, load_perf_model
from tokenyard.worker.engines.mocker.request import FinishReason, MockerRequest, Timings, TokenChunk, Usage
from tokenyard.worker.engines.mocker.scheduler import Scheduler, StepResult
from tokenyard.worker.kv_events import KvEvent, KvEventListener, KvEventPublisher, KvStored

log = logging.getLogger(__name__)

# A rank that falls further behind its chained deadlines than this restarts its clock from now
# instead of rushing steps out to catch up (the event loop was blocked, not the model slow).
_MAX_LAG_S = 0.05


class EngineError(RuntimeError):
    """The engine stopped or failed while the request was in flight."""


@dataclass(frozen=True, slots=True)
class RankLoad:
    dp_rank: int
    active_blocks: int
    total_blocks: int
    waiting: int
    running: int
    active_prefill_tokens: int


@dataclass(frozen=True, slots=True)
class KvSnapshot:
    """Everything a rank has cached, as ``stored`` events, as of event ``last_event_id``."""

    dp_rank: int
    last_event_id: int
    events: tuple[KvStored, ...]


@dataclass(frozen=True, slots=True)
class StepReport:
    dp_rank: int
    result: StepResult
    duration_s: float
    """Wall-clock time the step was given (model time after speedup)."""


StepListener = Callable[[StepReport], None]


@dataclass(slots=True)
class _Stream:
    request: MockerRequest
    dp_rank: int
    accepted_at: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: BaseException | None = None


class _Rank:
    def __init__(self, dp_rank: int, scheduler: Scheduler, events: KvEventPublisher) -> None:
        self.dp_rank = dp_rank
        self.scheduler = scheduler
        self.events = events
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class MockerEngine:
    def __init__(
        self,
        config: MockerConfig | None = None,
        *,
        role: EngineRole = EngineRole.AGGREGATED,
        perf_model: PerfModel | None = None,
    ) -> None:
        self.config = config or MockerConfig()
        self.role = role
        self.perf_model = perf_model or load_perf_model(self.config.perf_model_path)
        self._ranks: list[_Rank] = []
        for dp_rank in range(self.config.dp_size):
            publisher = KvEventPublisher(dp_rank)
            scheduler = Scheduler(
                self.config,
                self.perf_model,
                role=role,
                event_sink=publisher.publish if self.publishes_kv_events else None,
            )
            self._ranks.append(_Rank(dp_rank, scheduler, publisher))
        self._streams: dict[str, _Stream] = {}
        self._step_listeners: list[StepListener] = []
        self._running = False
        self._failure: BaseException | None = None

    @property
    def publishes_kv_events(self) -> bool:
        """Decode workers keep no cache a router could use; without prefix caching there is none."""
        return self.role is not EngineRole.DECODE and self.config.enable_prefix_caching

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        for rank in self._ranks:
            rank.task = asyncio.create_task(self._run(rank), name=f"mocker-rank-{rank.dp_rank}")

    async def stop(self) -> None:
        """Stop stepping; requests still in flight end with ``cancelled``."""
        self._running = False
        tasks = [rank.task for rank in self._ranks if rank.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for rank in self._ranks:
            rank.task = None
        for request_id in list(self._streams):
            self.abort(request_id)

    async def __aenter__(self) -> MockerEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, request: MockerRequest) -> AsyncGenerator[TokenChunk, None]:
        """Stream the request's tokens; leaving the loop early (or being cancelled) aborts it.

        Raises ValueError for a request this engine can never serve, EngineError if the engine
        is not running or fails meanwhile.
        """
        if self._failure is not None:
            raise EngineError("the engine failed") from self._failure
        if not self._running:
            raise EngineError("the engine is not running")
        if request.request_id in self._streams:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        rank = self._pick_rank(request)
        rank.scheduler.add(request)
        loop = asyncio.get_running_loop()
        stream = _Stream(request, rank.dp_rank, loop.time())
        self._streams[request.request_id] = stream
        rank.wake.set()
        try:
            while True:
                await stream.ready.wait()
                stream.ready.clear()
                if stream.error is not None:
                    raise EngineError("the engine failed") from stream.error
                tokens, stream.tokens = tuple(stream.tokens), []
                if stream.finish_reason is None:
                    if tokens:
                        yield TokenChunk(tokens, rank.dp_rank)
                    continue
                delay = (
                    0.0 if stream.finish_reason is FinishReason.CANCELLED else self._handoff_delay_s(request)
                )
                if delay > 0:
                    await asyncio.sleep(delay)
                now = loop.time()
                first = None if stream.first_token_at is None else stream.first_token_at - stream.accepted_at
                yield TokenChunk(
                    tokens,
                    rank.dp_rank,
                    finish_reason=stream.finish_reason,
                    usage=stream.usage,
                    timings=Timings(first_token_s=first, total_s=now - stream.accepted_at),
                )
                return
        finally:
            if self._streams.get(request.request_id) is stream:
                del self._streams[request.request_id]
                rank.scheduler.abort(request.request_id)

    def abort(self, request_id: str) -> bool:
        """End a request now and free its blocks; its stream ends with ``cancelled``."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        usage = self._ranks[stream.dp_rank].scheduler.abort(request_id)
        stream.finish_reason = FinishReason.CANCELLED
        stream.usage = usage or Usage(len(stream.request.token_ids), 0, 0)
        stream.ready.set()
        return True

    def _pick_rank(self, request: MockerRequest) -> _Rank:
        if request.dp_rank is not None:
            if request.dp_rank >= len(self._ranks):
                raise ValueError(
                    f"dp_rank {request.dp_rank} out of range: the engine has {len(self._ranks)} ranks"
                )
            return self._ranks[request.dp_rank]
        return min(
            self._ranks,
            key=lambda r: (
                len(r.scheduler.waiting) + len(r.scheduler.running),
                r.scheduler.blocks.num_active_blocks,
                r.dp_rank,
            ),
        )

    def _handoff_delay_s(self, request: MockerRequest) -> float:
        """A prefill worker's last token waits for its KV to reach the decode worker."""
        cfg = self.config
        if self.role is not EngineRole.PREFILL or cfg.speedup_ratio == 0:
            return 0.0
        if cfg.kv_transfer_bandwidth_gbps <= 0 or cfg.kv_bytes_per_token <= 0:
            return 0.0
        seconds = len(request.token_ids) * cfg.kv_bytes_per_token / (cfg.kv_transfer_bandwidth_gbps * 1e9)
        return seconds / cfg.speedup_ratio

    # -- observation ------------------------------------------------------------------------

    def load(self) -> tuple[RankLoad, ...]:
        return tuple(
            RankLoad(
                dp_rank=r.dp_rank,
                active_blocks=r.scheduler.blocks.num_active_blocks,
                total_blocks=r.scheduler.blocks.num_blocks,
                waiting=len(r.scheduler.waiting),
                running=len(r.scheduler.running),
                active_prefill_tokens=r.scheduler.active_prefill_tokens,
            )
            for r in self._ranks
        )

    def subscribe_kv_events(self, listener: KvEventListener) -> Callable[[], None]:
        """Call ``listener`` synchronously for every later event of every rank, in each rank's order."""
        stops = [rank.events.subscribe(listener) for rank in self._ranks]

        def unsubscribe() -> None:
            for stop in stops:
                stop()

        return unsubscribe

    async def kv_events(self) -> AsyncGenerator[KvEvent, None]:
        """Every later KV event of every rank, in order per rank, until the caller stops iterating."""
        queue: asyncio.Queue[KvEvent] = asyncio.Queue()
        unsubscribe = self.subscribe_kv_events(queue.put_nowait)
        try:
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    def kv_snapshot(self, dp_rank: int = 0) -> KvSnapshot:
        rank = self._ranks[dp_rank]
        events = tuple(rank.scheduler.blocks.snapshot()) if self.publishes_kv_events else ()
        return KvSnapshot(dp_rank, rank.events.last_event_id, events)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block on every rank (each publishes ``cleared``)."""
        for rank in self._ranks:
            rank.scheduler.blocks.reset()

    def subscribe_steps(self, listener: StepListener) -> Callable[[], None]:
        """Call ``listener`` after every step that did work, with its counts and duration."""
        self._step_listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._step_listeners:
                self._step_listeners.remove(listener)

        return unsubscribe

    # -- the step loop ----------------------------------------------------------------------

    def _step_seconds(self, result: StepResult) -> float:
        cfg = self.config
        if cfg.speedup_ratio == 0:
            return 0.0
        seconds = result.prefill_ms / cfg.speedup_ratio
        if cfg.decode_speedup_ratio > 0:
            seconds += result.decode_ms / (cfg.speedup_ratio * cfg.decode_speedup_ratio)
        return seconds / 1000.0

    async def _run(self, rank: _Rank) -> None:
        loop = asyncio.get_running_loop()
        due: float | None = None  # when the previous step was due to end
        try:
            while True:
                if not rank.scheduler.has_work:
                    due = None
                    rank.wake.clear()
                    await rank.wake.wait()
                    continue
                result = rank.scheduler.step()
                if result.idle:
                    # Nothing could run (cannot happen with a consistent cache); wait for a change.
                    due = None
                    rank.wake.clear()
                    await rank.wake.wait()
                    continue
                seconds = self._step_seconds(result)
                if seconds > 0:
                    now = loop.time()
                    start = due if due is not None and due >= now - _MAX_LAG_S else now
                    due = start + seconds
                    await asyncio.sleep(max(0.0, due - loop.time()))
                else:
                    due = None
                    await asyncio.sleep(0)
                self._deliver(rank, result, loop.time())
                report = StepReport(rank.dp_rank, result, seconds)
                for listener in tuple(self._step_listeners):
                    listener(report)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("mocker rank %d failed", rank.dp_rank)
            self._failure = exc
            for stream in self._streams.values():
                if stream.dp_rank == rank.dp_rank:
                    stream.error = exc
                    stream.ready.set()

    def _deliver(self, rank: _Rank, result: StepResult, now: float) -> None:
        for out in result.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted while the step was running
                continue
            stream.tokens.append(out.token_id)
            if stream.first_token_at is None:
                stream.first_token_at = now
            if out.finish_reason is not None:
                stream.finish_reason = out.finish_reason
                stream.usage = out.usage
                # The request is done in the scheduler; the stream no longer owns anything to abort.
                del self._streams[out.request_id]
            stream.ready.set()
