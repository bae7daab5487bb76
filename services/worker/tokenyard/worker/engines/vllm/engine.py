"""vLLM's engine behind a worker: v1 ``AsyncLLM`` in this process, its engine core in a spawned one.

vLLM schedules, batches and caches by itself; this adapter only translates:

* requests: token ids in, ``RequestOutputKind.DELTA`` outputs streamed back as chunks; closing a
  stream (or :meth:`VllmEngine.abort`) aborts the vLLM request;
* KV events: vLLM's publisher (ZMQ, on an ``ipc://`` path in a private folder or a loopback port)
  is read by a task on this loop and translated (:mod:`.kv_translate`) into Tokenyard's events,
  numbered by our own :class:`~tokenyard.worker.kv_events.KvEventPublisher`;
* load and per-step metrics: a stat logger vLLM calls on this loop after every engine step with its
  scheduler stats (running, waiting, KV usage, and iteration details: prefill and decode requests
  and tokens, step time).

Everything vLLM-facing is typed ``Any``: vLLM ships no type information for mypy, and the main
environment, where the project is type-checked, does not install it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from vllm import SamplingParams as VllmSamplingParams
from vllm.config import KVEventsConfig, StructuredOutputsConfig
from vllm.distributed.kv_events import KVEventBatch
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import GracefulHTTPError, VLLMClientError
from vllm.inputs.engine import tokens_input
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from tokenyard.common.errors import AlreadyExists, InvalidArgument, Overloaded, Unavailable
from tokenyard.worker.engines.base import (
    EngineInfo,
    EngineRequest,
    FinishReason,
    GenerateChunk,
    GuidedKind,
    KvSnapshot,
    RankLoad,
    StepListener,
    StepMetrics,
    StepRequests,
    Usage,
)
from tokenyard.worker.engines.cpu.model import ModelLoadError
from tokenyard.worker.engines.vllm.config import VllmEngineConfig
from tokenyard.worker.engines.vllm.kv_translate import KvEventTranslator
from tokenyard.worker.engines.vllm.weights import ModelFolder, prepare_weights
from tokenyard.worker.kv_events import KvEventListener, KvEventPublisher

log = logging.getLogger(__name__)

GUIDED_KINDS = (GuidedKind.JSON_OBJECT, GuidedKind.JSON_SCHEMA)
# vLLM's publisher answers a replay request with every batch it still holds from the asked
# sequence number on, then an end marker (sequence number -1).
_REPLAY_END = -1
_REPLAY_TIMEOUT_S = 5.0
# Batches vLLM keeps for replay: one per engine step that changed the cache.
_REPLAY_BUFFER_STEPS = 10_000
_SHUTDOWN_TIMEOUT_S = 20.0

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
    "error": FinishReason.ERROR,
    # vLLM's hallucination guard ended a repetitive output: the model is done, not cut short.
    "repetition": FinishReason.STOP,
}


@dataclass(slots=True)
class _InFlight:
    prompt_len: int
    first_token: bool = False


@dataclass(frozen=True, slots=True)
class _SchedulerView:
    """The newest of vLLM's scheduler stats that matter here."""

    running: int
    waiting: int
    kv_usage: float
    """Fraction of the KV pool held by running requests (cached but unreferenced blocks are free)."""
    at_unix_ns: int


class _StatLogger:
    """A per-engine stat logger in vLLM's sense (vLLM only calls these four methods): every engine
    step's scheduler stats go to ``sink``."""

    def __init__(self, sink: Callable[[Any], None]) -> None:
        self._sink = sink

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._sink(scheduler_stats)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class _KvSubscriber:
    """Reads vLLM's KV event batches in order, repairing a gap from vLLM's replay buffer."""

    def __init__(self, endpoint: str, replay_endpoint: str | None, on_batch: Callable[[Any], None]) -> None:
        self._ctx: Any = zmq.asyncio.Context()
        self._sub: Any = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        # vLLM binds ipc:// endpoints and connects to tcp:// ones that name a host: whoever does
        # not bind connects.
        try:
            if endpoint.startswith("ipc://"):
                self._sub.connect(endpoint)
            else:
                self._sub.bind(endpoint)
        except zmq.ZMQError:
            self._sub.close(linger=0)
            self._ctx.term()
            raise
        self._replay_endpoint = replay_endpoint
        self._on_batch = on_batch
        self._decoder: Any = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._next_seq = 0
        self.lost_batches = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vllm-kv-events")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sub.close(linger=0)
        self._ctx.term()

    async def _run(self) -> None:
        while True:
            frames = await self._sub.recv_multipart()
            try:
                self._receive(frames)
                if len(frames) == 3 and int.from_bytes(frames[1], "big", signed=True) > self._next_seq:
                    await self._repair(frames)
            except Exception:  # one bad batch must not stop the stream
                log.exception("cannot apply a vLLM KV event batch")

    def _receive(self, frames: list[bytes]) -> None:
        """Apply the batch if it is the next one; an earlier one was replayed already."""
        if len(frames) != 3:
            log.warning("ignoring a vLLM KV event message of %d frames", len(frames))
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        if seq == self._next_seq:
            self._next_seq = seq + 1
            self._on_batch(self._decoder.decode(frames[2]))

    async def _repair(self, live: list[bytes]) -> None:
        """Batches ``_next_seq`` .. the live one's were missed (a subscriber that joined late, a
        full queue): ask vLLM's replay buffer for them, then apply the live one."""
        wanted = int.from_bytes(live[1], "big", signed=True)
        first_missing = self._next_seq
        if self._replay_endpoint is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._replay(first_missing), _REPLAY_TIMEOUT_S)
        if self._next_seq < wanted:
            lost = wanted - self._next_seq
            self.lost_batches += lost
            log.warning(
                "lost %d vLLM KV event batches (%d..%d): routers may miss blocks until they are evicted",
                lost,
                self._next_seq,
                wanted - 1,
            )
            self._next_seq = wanted
        self._receive(live)

    async def _replay(self, start: int) -> None:
        dealer: Any = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self._replay_endpoint)
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await dealer.recv_multipart()
                # A DEALER sees the empty delimiter the ROUTER keeps: [b"", topic, seq, payload].
                body = frames[1:]
                if len(body) == 3 and int.from_bytes(body[1], "big", signed=True) == _REPLAY_END:
                    return
                self._receive(body)
        finally:
            dealer.close(linger=0)


class VllmEngine:
    """:class:`~tokenyard.worker.engines.base.Engine` over vLLM's ``AsyncLLM`` (aggregated role)."""

    kind = "vllm"

    def __init__(self, config: VllmEngineConfig | None = None) -> None:
        self.config = config or VllmEngineConfig()
        self._events = KvEventPublisher(0)
        self._translator = KvEventTranslator(self.config.block_size, self._events.publish)
        self._llm: Any = None
        self._folder: ModelFolder | None = None
        self._info: EngineInfo | None = None
        self._subscriber: _KvSubscriber | None = None
        self._workdir: Path | None = None
        self._requests: dict[str, _InFlight] = {}
        self._aborted: set[str] = set()
        self._step_listeners: list[StepListener] = []
        self._scheduler: _SchedulerView | None = None
        self.start_seconds = 0.0
        """Seconds the last :meth:`start` took (weights, and vLLM's engine core until ready)."""

    @property
    def publishes_kv_events(self) -> bool:
        return self.config.enable_prefix_caching

    @property
    def model_folder(self) -> Path:
        if self._folder is None:
            raise Unavailable("the vllm engine has not prepared its model yet")
        return self._folder.path

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._llm is not None:
            return
        started = time.perf_counter()
        try:
            folder = self._folder = await asyncio.to_thread(prepare_weights, self.config)
        except ModelLoadError as exc:
            raise Unavailable(str(exc)) from None
        self._workdir = Path(tempfile.mkdtemp(prefix="tokenyard-vllm-"))
        endpoint, replay = self._event_endpoints(self._workdir)
        if self.publishes_kv_events:
            # Listening before vLLM starts: its first batches are not lost to a late join.
            try:
                self._subscriber = _KvSubscriber(endpoint, replay, self._on_kv_batch)
            except zmq.ZMQError as exc:
                await self._close_side_channels()
                raise Unavailable(
                    f"cannot listen for vLLM's KV events on {endpoint}: {exc} "
                    "(--vllm-kv-events-endpoint / TOKENYARD_WORKER_VLLM__KV_EVENTS_ENDPOINT)"
                ) from None
            self._subscriber.start()
        self._configure_environment()
        args = self._engine_args(folder.path, endpoint, replay)
        loop = asyncio.get_running_loop()
        # AsyncLLM's constructor blocks until the engine core is up (tens of seconds on a CPU);
        # it needs no event loop, so it runs on a thread while this loop keeps serving.
        building = loop.run_in_executor(None, self._build, args)
        try:
            self._llm = await asyncio.shield(building)
        except asyncio.CancelledError:
            building.add_done_callback(_shutdown_when_built)
            await self._close_side_channels()
            raise
        except Exception as exc:
            await self._close_side_channels()
            raise Unavailable(f"vLLM could not start: {exc}") from None
        # vLLM starts its output handler on the first request; started now, step stats (load)
        # and an engine core that dies while idle are seen at once.
        start_output_handler = getattr(self._llm, "_run_output_handler", None)
        if start_output_handler is not None:
            start_output_handler()
        info = self._info = self._read_info(folder)
        if info.block_size != self._translator.block_size:
            # vLLM chose another block size than asked for (its platform's kernels decide):
            # events and the model card follow what it runs.
            log.warning("vLLM runs %d-token KV blocks, not %d", info.block_size, self._translator.block_size)
            self._translator.block_size = info.block_size
        self.start_seconds = time.perf_counter() - started
        log.info(
            "vllm engine ready in %.1fs%s: %d KV blocks of %d tokens, context %d, model %s",
            self.start_seconds,
            " (converted the model first)" if folder.converted else "",
            info.total_kv_blocks,
            info.block_size,
            info.context_length,
            folder.path,
        )

    def _build(self, args: Any) -> Any:
        return AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger])

    def _stat_logger(self, vllm_config: Any, engine_index: int = 0) -> _StatLogger:
        return _StatLogger(self._on_scheduler_stats)

    def _event_endpoints(self, workdir: Path) -> tuple[str, str | None]:
        endpoint = self.config.kv_events_endpoint
        if not endpoint:
            return f"ipc://{workdir / 'kv-events'}", f"ipc://{workdir / 'kv-replay'}"
        if endpoint.startswith("ipc://"):
            return endpoint, f"{endpoint}-replay"
        # A loopback tcp endpoint: vLLM connects to it (we bind), and its replay socket would need
        # a second port; gaps are then only logged.
        return endpoint, None

    def _configure_environment(self) -> None:
        """vLLM reads these from the environment of the process that builds its engine."""
        # Forking a process that runs gRPC threads and an event loop is unsafe; spawn starts clean.
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
            log.info("ignoring VLLM_CPU_KVCACHE_SPACE: the KV cache size is --vllm-kv-cache-gib")
        if self.config.omp_threads_bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.config.omp_threads_bind

    def _engine_args(self, folder: Path, endpoint: str, replay: str | None) -> Any:
        cfg = self.config
        events = (
            KVEventsConfig(
                enable_kv_cache_events=True,
                publisher="zmq",
                endpoint=endpoint,
                replay_endpoint=replay,
                buffer_steps=_REPLAY_BUFFER_STEPS,
            )
            if self.publishes_kv_events
            else None
        )
        return AsyncEngineArgs(
            model=str(folder),
            dtype=cfg.dtype,
            # No torch.compile: on a CPU it costs minutes at start for little.
            enforce_eager=True,
            block_size=cfg.block_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            # The exact size, where VLLM_CPU_KVCACHE_SPACE only takes whole GiB.
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * (1 << 30)),
            kv_events_config=events,
            structured_outputs_config=StructuredOutputsConfig(
                backend=cfg.structured_output_backend, disable_any_whitespace=cfg.compact_json
            ),
            # Tokenyard's priority classes map onto vLLM's (negated: vLLM runs the lowest first).
            scheduling_policy="priority",
            # Our stat logger gets the stats; vLLM's own periodic log lines are not wanted.
            disable_log_stats=True,
            enable_logging_iteration_details=True,
            enable_log_requests=False,
        )

    def _read_info(self, folder: ModelFolder) -> EngineInfo:
        vllm_config = self._llm.vllm_config
        cache, scheduler = vllm_config.cache_config, vllm_config.scheduler_config
        eos = folder.eos_token_ids
        if not eos:
            tokenizer_eos = getattr(self._llm.tokenizer, "eos_token_id", None)
            eos = (int(tokenizer_eos),) if isinstance(tokenizer_eos, int) else ()
        return EngineInfo(
            kind=self.kind,
            dp_size=1,
            block_size=int(cache.block_size),
            context_length=int(vllm_config.model_config.max_model_len),
            # vLLM keeps block 0 as a placeholder ("null block") that never holds KV.
            total_kv_blocks=int(cache.num_gpu_blocks) - 1,
            max_num_seqs=int(scheduler.max_num_seqs),
            max_num_batched_tokens=int(scheduler.max_num_batched_tokens),
            eos_token_ids=eos,
            publishes_kv_events=self.publishes_kv_events,
        )

    async def stop(self) -> None:
        """Abort what is in flight (those streams end with ``cancelled``), then stop vLLM."""
        llm, self._llm = self._llm, None
        if llm is not None:
            if self._requests:
                self._aborted.update(self._requests)
                with contextlib.suppress(Exception):
                    await llm.abort(list(self._requests))
                # Let the aborted streams deliver their last chunk before the engine goes.
                await asyncio.sleep(0)
            # vLLM stops its output handler only after its engine core is gone, and the handler
            # logs that loss as a failure; nothing is in flight any more, so it goes first.
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
                await asyncio.wait([handler])
            # vLLM's default wait (5 s) is short for its engine core's teardown on a busy CPU,
            # which it then kills.
            await asyncio.to_thread(llm.shutdown, _SHUTDOWN_TIMEOUT_S)
        await self._close_side_channels()

    async def _close_side_channels(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            await subscriber.close()
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    async def __aenter__(self) -> VllmEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def info(self) -> EngineInfo:
        if self._info is None:
            raise Unavailable("the vllm engine is not started")
        return self._info

    def guided_kinds(self) -> tuple[GuidedKind, ...]:
        return GUIDED_KINDS if self._info is not None else ()

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[GenerateChunk, None]:
        llm = self._llm
        if llm is None:
            raise Unavailable("the vllm engine is not running")
        if llm.errored:
            raise Unavailable(f"the vllm engine failed: {llm.dead_error}")
        rid = request.request_id
        if rid in self._requests:
            raise AlreadyExists(f"request {rid!r} is already running on this worker")
        if request.prefill_only or request.kv_transfer is not None:
            raise InvalidArgument("the vllm engine serves the aggregated role only: no prefill-only requests")
        if request.lora_name:
            raise InvalidArgument(
                f"the vllm engine serves no LoRA adapters (asked for {request.lora_name!r})"
            )
        try:
            params = self._sampling_params(request)
        except (ValueError, TypeError, VLLMClientError) as exc:
            raise InvalidArgument(str(exc)) from None
        # Already tokenized: a rendered input skips vLLM's prompt processing.
        prompt = tokens_input(list(request.token_ids), cache_salt=request.cache_salt or None)
        state = self._requests[rid] = _InFlight(len(request.token_ids))
        produced = 0
        try:
            # vLLM's generator aborts the request in its engine when it is closed before the end.
            async with aclosing(llm.generate(prompt, params, rid, priority=-request.priority)) as outputs:
                async for out in outputs:
                    completion = out.outputs[0]
                    tokens = tuple(completion.token_ids)
                    if tokens:
                        state.first_token = True
                        produced += len(tokens)
                    if not out.finished:
                        if tokens:
                            yield GenerateChunk(tokens)
                        continue
                    reason = _FINISH_REASONS.get(str(completion.finish_reason), FinishReason.ERROR)
                    if rid in self._aborted:
                        reason = FinishReason.CANCELLED
                    if reason is FinishReason.ERROR and produced == 0:
                        raise Unavailable("vLLM failed the request before it produced a token")
                    usage = Usage(len(request.token_ids), produced, int(out.num_cached_tokens or 0))
                    yield GenerateChunk(tokens, reason, usage, queued_s=_queued_seconds(out))
                    return
        except EngineGenerateError as exc:
            cause = exc.__cause__
            if produced == 0 and isinstance(cause, ValueError | TypeError | VLLMClientError):
                raise InvalidArgument(str(cause)) from None
            if produced == 0:
                raise Unavailable(f"vLLM failed the request: {cause or exc}") from None
            log.warning("vLLM failed request %s after %d tokens: %s", rid, produced, cause or exc)
            yield GenerateChunk((), FinishReason.ERROR, Usage(len(request.token_ids), produced, 0))
        except VLLMClientError as exc:
            raise InvalidArgument(str(exc)) from None
        except GracefulHTTPError as exc:
            raise Overloaded(f"vLLM refused the request: {exc}") from None
        except EngineDeadError as exc:
            if produced == 0:
                raise Unavailable(f"the vllm engine died: {exc}") from None
            yield GenerateChunk((), FinishReason.ERROR, Usage(len(request.token_ids), produced, 0))
        finally:
            self._requests.pop(rid, None)
            self._aborted.discard(rid)

    def _sampling_params(self, request: EngineRequest) -> Any:
        cfg, s = self.config, request.sampling
        options: dict[str, Any] = {
            "temperature": cfg.default_temperature if s.temperature is None else s.temperature,
            "top_p": cfg.default_top_p if s.top_p is None else s.top_p,
            # None: vLLM fills in what the context leaves after the prompt.
            "max_tokens": request.max_tokens,
            "min_tokens": request.min_tokens,
            "ignore_eos": request.ignore_eos,
            "stop_token_ids": sorted(request.stop_token_ids),
            "seed": s.seed,
            "output_kind": RequestOutputKind.DELTA,
            # Token ids only: the frontend detokenizes.
            "detokenize": False,
        }
        for name in ("top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(s, name)
            if value is not None:
                options[name] = value
        guided = request.guided
        if guided is not None:
            compact = cfg.compact_json
            if guided.kind is GuidedKind.JSON_OBJECT:
                options["structured_outputs"] = StructuredOutputsParams(
                    json_object=True, disable_any_whitespace=compact
                )
            elif guided.kind is GuidedKind.JSON_SCHEMA:
                options["structured_outputs"] = StructuredOutputsParams(
                    json=guided.json_schema, disable_any_whitespace=compact
                )
            else:
                raise InvalidArgument(f"the vllm engine cannot constrain its output to {guided.kind.value}")
        return VllmSamplingParams(**options)

    def abort(self, request_id: str) -> bool:
        llm = self._llm
        if llm is None or request_id not in self._requests:
            return False
        self._aborted.add(request_id)
        # vLLM ends the stream at once with an "abort" output, which reads as cancelled.
        task = asyncio.get_running_loop().create_task(llm.abort(request_id), name=f"vllm-abort-{request_id}")
        task.add_done_callback(_log_failure)
        return True

    # -- observation ------------------------------------------------------------------------

    def _on_scheduler_stats(self, stats: Any) -> None:
        now = time.time_ns()
        waiting = int(stats.num_waiting_reqs) + int(getattr(stats, "num_skipped_waiting_reqs", 0))
        self._scheduler = _SchedulerView(
            int(stats.num_running_reqs), waiting, float(stats.kv_cache_usage), now
        )
        details = getattr(stats, "iteration_details", None)
        if details is None or details.is_dummy or not self._step_listeners:
            return
        metrics = StepMetrics(
            dp_rank=0,
            wall_time_s=float(details.elapsed_ms) / 1000.0,
            scheduled=StepRequests(
                num_prefill_requests=int(details.num_ctx_requests),
                sum_prefill_tokens=int(details.num_ctx_tokens),
                num_decode_requests=int(details.num_generation_requests),
            ),
            queued=StepRequests(num_prefill_requests=waiting),
            timestamp_unix_ns=now,
        )
        for listener in tuple(self._step_listeners):
            listener(metrics)

    @property
    def scheduler_view(self) -> _SchedulerView | None:
        """vLLM's scheduler as of its last step (None before the first)."""
        return self._scheduler

    def load(self) -> tuple[RankLoad, ...]:
        now = time.time_ns()
        total = self._info.total_kv_blocks if self._info is not None else 0
        view = self._scheduler
        if view is None or not self._requests:
            # vLLM reports after its steps only: once the last request ended (or was aborted
            # between steps) its last report is stale, and the engine holds nothing.
            return (RankLoad(0, 0, total, 0, 0, 0, now),)
        prefill = sum(r.prompt_len for r in self._requests.values() if not r.first_token)
        return (
            RankLoad(
                dp_rank=0,
                active_blocks=round(view.kv_usage * total),
                total_blocks=total,
                waiting=view.waiting,
                running=view.running,
                active_prefill_tokens=prefill,
                timestamp_unix_ns=now,
            ),
        )

    @property
    def in_flight(self) -> int:
        """Requests this engine has handed to vLLM and not seen end."""
        return len(self._requests)

    def unfinished_in_vllm(self) -> int:
        """Requests vLLM's front end still tracks (0 once every abort went through)."""
        return int(self._llm.get_num_unfinished_requests()) if self._llm is not None else 0

    def subscribe_steps(self, listener: StepListener) -> Callable[[], None]:
        self._step_listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._step_listeners:
                self._step_listeners.remove(listener)

        return unsubscribe

    # -- KV events --------------------------------------------------------------------------

    def _on_kv_batch(self, batch: Any) -> None:
        rank = getattr(batch, "data_parallel_rank", None)
        if rank not in (None, 0):
            log.warning("ignoring KV events of vLLM data-parallel rank %s", rank)
            return
        self._translator.apply(batch.events)

    def subscribe_kv_events(self, listener: KvEventListener) -> Callable[[], None]:
        return self._events.subscribe(listener)

    def kv_snapshot(self, dp_rank: int) -> KvSnapshot:
        if dp_rank != 0:
            raise InvalidArgument(f"dp_rank {dp_rank} out of range: the engine has 1 rank")
        chains = tuple(self._translator.snapshot()) if self.publishes_kv_events else ()
        return KvSnapshot(0, self._events.last_event_id + 1, chains)

    def last_event_id(self, dp_rank: int) -> int:
        return self._events.last_event_id

    @property
    def translator(self) -> KvEventTranslator:
        """vLLM's cache as translated so far (its hashes and ours)."""
        return self._translator

    def cached_block_hashes(self) -> set[int]:
        """Sequence hashes of every block vLLM holds cached (what a router's index should mirror)."""
        return self._translator.block_hashes()

    @property
    def lost_event_batches(self) -> int:
        return self._subscriber.lost_batches if self._subscriber is not None else 0

    async def reset_prefix_cache(self) -> bool:
        """Ask vLLM to forget its cached blocks (it publishes ``cleared``); False when blocks are in use."""
        if self._llm is None:
            return False
        return bool(await self._llm.reset_prefix_cache())


def _queued_seconds(out: Any) -> float | None:
    stats = getattr(out, "metrics", None)
    queued, scheduled = getattr(stats, "queued_ts", 0.0), getattr(stats, "scheduled_ts", 0.0)
    if not queued or not scheduled:
        return None
    return max(0.0, float(scheduled) - float(queued))


def _shutdown_when_built(future: asyncio.Future[Any]) -> None:
    """A start that was cancelled while vLLM was still coming up: stop it once it is up."""
    if future.cancelled() or future.exception() is not None:
        return
    future.result().shutdown()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("aborting a vLLM request failed: %s", task.exception())
