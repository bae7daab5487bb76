"""The simulated engine's step executor: modelled step time and made-up tokens.

A step's state change happens at once (the batching core schedules it and commits it); this
executor only decides how long it takes and which tokens it produces.

Time: ``prefill + decode`` model milliseconds, from the perf model. Prefill over the requests that
compute prompt tokens, except those whose prompt a prefill worker computed (they carry transfer
parameters: the simulated decode side charges no prefill for them, as the reference's decode
workers do; a decode worker that prefills a prompt itself, as conditional disaggregation asks,
pays for it), decode over the requests that emit a token (never for a prefill-only request, whose one token
is the prefill's). Divided by the speedup ratios, that is how long
:meth:`MockerExecutor.execute` sleeps. The KV hand-off of a prefill-only request is charged on the
prefill side, before its one token is released (:meth:`MockerExecutor.finish_delay_s`), as the
reference does.
Step deadlines are chained (the next step starts when the previous one was due, not when the sleep
happened to return), so the timer's overshoot does not accumulate into the inter-token latency.
With ``speedup_ratio == 0`` nothing sleeps, and steps follow each other without yielding to the
event loop for up to ``ZERO_TIME_SLICE_S``: a yield per step would wake every request's stream per
step, which costs the worker far more than the step itself; a slice of steps wakes each stream once
with the slice's tokens. New requests and cancellations are seen at the next yield.

Tokens: the token at absolute sequence position ``p`` (0 = the first prompt token) of a request
with seed ``s`` is ``XXH3-64(le_u64(s) || le_u64(p), seed=0) mod vocab_size``. It depends on
nothing else, so a request that is continued elsewhere (its generated tokens appended to the
prompt, the same seed) produces exactly the continuation it would have produced. Without an
explicit seed the seed is ``XXH3-64(utf8(request_id))``, which a migrated request keeps.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from tokenyard.worker.engines.base import EngineRequest, EngineRole
from tokenyard.worker.engines.core.block_pool import BlockPool, KvEventSink
from tokenyard.worker.engines.core.executor import ExecutorSpec
from tokenyard.worker.engines.core.scheduler import (
    Scheduled,
    Scheduler,
    SequenceState,
    TokenOutput,
)
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.perf_model import PerfModel, load_perf_model

_PAIR = struct.Struct("<QQ")
_U64 = (1 << 64) - 1
# A rank that falls further behind its chained deadlines than this restarts its clock from now
# instead of rushing steps out to catch up (the event loop was blocked, not the model slow).
_MAX_LAG_S = 0.05
ZERO_TIME_SLICE_S = 0.001
"""At speedup 0, how long steps run back to back before the engine yields to the event loop."""


def request_seed(request_id: str, seed: int | None = None) -> int:
    """The seed pseudo tokens of a request are drawn with."""
    return seed & _U64 if seed is not None else xxhash.xxh3_64_intdigest(request_id.encode())


def pseudo_token(seed: int, position: int, vocab_size: int) -> int:
    """The token a request with ``seed`` generates at absolute sequence ``position``."""
    return xxhash.xxh3_64_intdigest(_PAIR.pack(seed & _U64, position), seed=0) % vocab_size


@dataclass(frozen=True, slots=True)
class ModelledStep:
    prefill_ms: float
    """Model time of the prefill part, before any speedup."""
    decode_ms: float
    """Model time of the decode part, before any speedup."""
    tokens: dict[SequenceState, int]

    @property
    def total_ms(self) -> float:
        return self.prefill_ms + self.decode_ms


class MockerExecutor:
    """:class:`~tokenyard.worker.engines.core.executor.StepExecutor` of the simulated engine."""

    def __init__(
        self,
        config: MockerConfig,
        *,
        role: EngineRole = EngineRole.AGGREGATED,
        perf_model: PerfModel | None = None,
    ) -> None:
        self.config = config
        self.role = EngineRole(role)
        self.perf_model = perf_model or load_perf_model(config.perf_model_path)
        self._pools: dict[int, BlockPool] = {}
        self._due: dict[int, float | None] = {}
        # When each rank last yielded to the event loop (speedup 0).
        self._yielded: dict[int, float] = {}

    async def load(self) -> ExecutorSpec:
        cfg = self.config
        eos = () if cfg.eos_token_id is None else (cfg.eos_token_id,)
        return ExecutorSpec(
            num_blocks=cfg.num_gpu_blocks, context_length=cfg.max_sequence_len, eos_token_ids=eos
        )

    def bind(self, dp_rank: int, pool: BlockPool) -> None:
        self._pools[dp_rank] = pool
        self._due[dp_rank] = None

    def sampler(self, request: EngineRequest) -> int:
        return request_seed(request.request_id, request.sampling.seed)

    def model(self, pool: BlockPool, plan: Sequence[Scheduled]) -> ModelledStep:
        """The step's model time and tokens; pure, so tests step the scheduler by hand with it."""
        cfg = self.config
        ready = [w.seq for w in plan if w.samples]
        tokens = {seq: pseudo_token(seq.sampler, len(seq.tokens), cfg.vocab_size) for seq in ready}
        decode_ms = 0.0
        # A prefill-only request's one token costs no decode (the reference's prefill workers).
        decoding = [] if self.role is EngineRole.PREFILL else [s for s in ready if not s.request.prefill_only]
        if decoding:
            context = sum(len(seq.tokens) for seq in decoding)
            decode_ms = self.perf_model.decode_ms(
                len(decoding),
                pool.num_active_blocks * cfg.block_size,
                context / len(decoding),
                cfg.num_gpu_blocks * cfg.block_size,
            )
        return ModelledStep(self._prefill_ms(plan), decode_ms, tokens)

    def _prefill_ms(self, plan: Sequence[Scheduled]) -> float:
        prefills = [w for w in plan if w.prompt_tokens > 0 and w.seq.request.kv_transfer is None]
        if not prefills:
            return 0.0
        batch = len(prefills)
        mean_isl = sum(w.start + w.prompt_tokens for w in prefills) / batch
        mean_prefix = sum(w.start for w in prefills) / batch
        return self.perf_model.prefill_ms(batch, mean_isl, mean_prefix)

    def step_seconds(self, step: ModelledStep) -> float:
        cfg = self.config
        if cfg.speedup_ratio == 0:
            return 0.0
        seconds = step.prefill_ms / cfg.speedup_ratio
        if cfg.decode_speedup_ratio > 0:
            seconds += step.decode_ms / (cfg.speedup_ratio * cfg.decode_speedup_ratio)
        return seconds / 1000.0

    async def execute(self, dp_rank: int, plan: Sequence[Scheduled]) -> dict[SequenceState, int]:
        step = self.model(self._pools[dp_rank], plan)
        seconds = self.step_seconds(step)
        if seconds <= 0:
            self._due[dp_rank] = None
            now = time.perf_counter()
            if now - self._yielded.get(dp_rank, 0.0) >= ZERO_TIME_SLICE_S:
                await asyncio.sleep(0)
                self._yielded[dp_rank] = time.perf_counter()
            return step.tokens
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = self._due[dp_rank]
        start = due if due is not None and due >= now - _MAX_LAG_S else now
        self._due[dp_rank] = start + seconds
        await asyncio.sleep(max(0.0, start + seconds - loop.time()))
        return step.tokens

    def idle(self, dp_rank: int) -> None:
        """The chain of deadlines ends with the work: a step after an idle spell starts when it
        is planned. (Chained from the last deadline, a request arriving up to ``_MAX_LAG_S``
        after the rank went idle would be served as if it had arrived then: sooner than the
        model allows.)"""
        self._due[dp_rank] = None

    def finish_delay_s(self, seq: SequenceState) -> float:
        """A prefill-only request's one token waits for its KV to reach the decode worker:
        ``prompt tokens * kv_bytes_per_token / bandwidth``, divided by the speedup ratio."""
        cfg = self.config
        if not seq.request.prefill_only or cfg.speedup_ratio == 0:
            return 0.0
        if cfg.kv_transfer_bandwidth_gbps <= 0 or cfg.kv_bytes_per_token <= 0:
            return 0.0
        seconds = seq.prompt_len * cfg.kv_bytes_per_token / (cfg.kv_transfer_bandwidth_gbps * 1e9)
        return seconds / cfg.speedup_ratio

    async def close(self) -> None:
        """Nothing to let go of."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step of the simulated engine taken by hand (tests, calibration)."""

    prefill_ms: float
    decode_ms: float
    scheduled_tokens: int
    num_prefill_requests: int
    sum_prefill_tokens: int
    num_decode_requests: int
    num_waiting: int
    num_running: int
    outputs: tuple[TokenOutput, ...]
    preempted: tuple[str, ...]


def rank_by_hand(
    config: MockerConfig,
    *,
    role: EngineRole = EngineRole.AGGREGATED,
    perf_model: PerfModel | None = None,
    sink: KvEventSink | None = None,
) -> tuple[Scheduler, MockerExecutor]:
    """One rank of the simulated engine, built as the engine builds it, to step with
    :func:`step_by_hand` (tests, calibration, simulations)."""
    core = config.core_config()
    pool = BlockPool(
        config.num_gpu_blocks, core.block_size, enable_prefix_caching=core.enable_prefix_caching, sink=sink
    )
    eos = () if config.eos_token_id is None else (config.eos_token_id,)
    scheduler = Scheduler(pool, core.scheduler_config(config.max_sequence_len, eos))
    return scheduler, MockerExecutor(config, role=role, perf_model=perf_model)


def step_by_hand(scheduler: Scheduler, executor: MockerExecutor) -> StepResult:
    """Schedule, model and finish one step synchronously (no sleeping)."""
    plan = scheduler.schedule()
    preempted = tuple(seq.request_id for seq in scheduler.preempted)
    modelled = executor.model(scheduler.pool, plan)
    prefills = [w for w in plan if w.prompt_tokens > 0]
    outputs = scheduler.finish_step(plan, modelled.tokens)
    return StepResult(
        prefill_ms=modelled.prefill_ms,
        decode_ms=modelled.decode_ms,
        scheduled_tokens=sum(w.length for w in plan),
        num_prefill_requests=len(prefills),
        sum_prefill_tokens=sum(w.prompt_tokens for w in prefills),
        num_decode_requests=len(modelled.tokens),
        num_waiting=len(scheduler.waiting),
        num_running=len(scheduler.running),
        outputs=tuple(outputs),
        preempted=preempted,
    )
