"""Load-based scaling (``dynamo-behavior.md`` §5.4): regressions of step time learned online from
per-step engine metrics, and a +1 / -1 decision per pool from the latency they predict.

Models (ms per engine step, ordinary least squares with an intercept):

* prefill: ``wall ~ sum_prefill_tokens``
* decode: ``wall ~ num_decode_requests + sum_decode_kv_tokens`` (only the request-count
  coefficient may be negative)
* aggregated: ``wall ~ sum_prefill_tokens + sum_decode_kv_tokens``

A model with a negative token coefficient, or fewer than ``min_observations`` samples, is not
ready, and its pool holds. Samples live in a bucketed store: at most ``max_samples``, spread
over buckets of the features (16 along log2 of the prefill tokens; 4 x 4 along log2 of the
decode requests and KV tokens), evicting the oldest sample of the fullest bucket, so that a long
quiet spell does not push out what the model knows about heavy steps. Idle heartbeats
(``wall == 0``) are ignored.

Decisions per pool, from each worker's latest state:

* up by one when **every** worker's estimate breaks its target (TTFT for prefill, ITL for
  decode, either for aggregated);
* down by one only when, with the queue of ``N`` workers spread over ``N - 1``, every
  worker's estimate stays below ``target * sensitivity / 100`` (prefill: the queue-induced part of
  TTFT must fit ``(target - own prefill time) * sensitivity``; decode: the KV must also fit);
* otherwise hold.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tokenyard.planner.perf import chunked
from tokenyard.planner.pools import Pool
from tokenyard.planner.throughput import MAX_HIT_RATE, Targets


@dataclass(frozen=True, slots=True)
class StepSample:
    """One engine step of one worker rank (or an idle heartbeat with ``wall_ms == 0``)."""

    worker_id: int
    wall_ms: float
    prefill_requests: int = 0
    prefill_tokens: int = 0
    decode_requests: int = 0
    decode_kv_tokens: int = 0
    queued_prefill_requests: int = 0
    queued_prefill_tokens: int = 0
    queued_decode_requests: int = 0
    queued_decode_kv_tokens: int = 0
    dp_rank: int = 0
    timestamp_ns: int = 0


def _log_bucket(value: float, width: float, count: int) -> int:
    return min(count - 1, int(math.log2(1 + max(0.0, value)) / width))


class BucketedStore:
    """At most ``max_samples`` feature rows, spread over buckets (see the module docstring)."""

    def __init__(self, max_samples: int, bucket_of: Callable[[Sequence[float]], int]) -> None:
        self.max_samples = max_samples
        self._bucket_of = bucket_of
        self._buckets: dict[int, deque[tuple[int, tuple[float, ...], float]]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, features: Sequence[float], wall_ms: float) -> None:
        self._seq += 1
        key = self._bucket_of(features)
        self._buckets.setdefault(key, deque()).append((self._seq, tuple(features), wall_ms))
        if len(self) > self.max_samples:
            fullest = max(self._buckets.values(), key=lambda b: (len(b), -b[0][0]))
            fullest.popleft()

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        items = [item for bucket in self._buckets.values() for item in bucket]
        x = np.array([features for _, features, _ in items], dtype=np.float64)
        y = np.array([wall for _, _, wall in items], dtype=np.float64)
        return x, y


@dataclass
class Regression:
    """``wall_ms = intercept + coef . features``, refitted on demand."""

    names: tuple[str, ...]
    may_be_negative: tuple[bool, ...]
    store: BucketedStore
    min_observations: int = 5
    intercept: float = 0.0
    coef: tuple[float, ...] = ()
    reason: str = "no observations yet"

    def add(self, features: Sequence[float], wall_ms: float) -> None:
        self.store.add(features, wall_ms)

    def fit(self) -> bool:
        n = len(self.store)
        if n < self.min_observations:
            self.coef, self.reason = (), f"{n} of {self.min_observations} observations"
            return False
        x, y = self.store.rows()
        design = np.column_stack([np.ones(len(y)), x])
        solution, *_ = np.linalg.lstsq(design, y, rcond=None)
        coef = tuple(float(c) for c in solution[1:])
        bad = [
            name
            for name, c, neg_ok in zip(self.names, coef, self.may_be_negative, strict=True)
            if c < 0 and not neg_ok
        ]
        if bad:
            self.coef, self.reason = (), f"negative coefficient on {', '.join(bad)}"
            return False
        self.intercept, self.coef, self.reason = float(solution[0]), coef, ""
        return True

    @property
    def ready(self) -> bool:
        return bool(self.coef)

    def predict(self, *features: float) -> float:
        return max(0.0, self.intercept + sum(c * f for c, f in zip(self.coef, features, strict=True)))


def prefill_regression(max_samples: int = 64, min_observations: int = 5) -> Regression:
    store = BucketedStore(max_samples, lambda f: _log_bucket(f[0], 1.0, 16))
    return Regression(("prefill_tokens",), (False,), store, min_observations)


def decode_regression(max_samples: int = 64, min_observations: int = 5) -> Regression:
    store = BucketedStore(max_samples, lambda f: _log_bucket(f[0], 2.0, 4) * 4 + _log_bucket(f[1], 4.0, 4))
    return Regression(("decode_requests", "decode_kv_tokens"), (True, False), store, min_observations)


def aggregated_regression(max_samples: int = 64, min_observations: int = 5) -> Regression:
    store = BucketedStore(max_samples, lambda f: _log_bucket(f[0], 4.0, 4) * 4 + _log_bucket(f[1], 4.0, 4))
    return Regression(("prefill_tokens", "decode_kv_tokens"), (False, False), store, min_observations)


# ---- per-worker state ----------------------------------------------------------------------------


@dataclass
class WorkerLoad:
    """A worker's latest queue and its recent decode batch, from its step samples."""

    worker_id: int
    last: StepSample | None = None
    recent_decode: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=32))
    recent_prefill_tokens: deque[int] = field(default_factory=lambda: deque(maxlen=32))
    recent_prompt_lengths: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    recent_decode_lengths: deque[float] = field(default_factory=lambda: deque(maxlen=32))

    def observe(self, sample: StepSample) -> None:
        self.last = sample
        if sample.wall_ms > 0:
            self.recent_decode.append((sample.decode_requests, sample.decode_kv_tokens))
            self.recent_prefill_tokens.append(sample.prefill_tokens)
            if sample.prefill_requests:
                self.recent_prompt_lengths.append(sample.prefill_tokens / sample.prefill_requests)
            if sample.decode_requests:
                self.recent_decode_lengths.append(sample.decode_kv_tokens / sample.decode_requests)

    @property
    def avg_decode_requests(self) -> float:
        return float(np.mean([n for n, _ in self.recent_decode])) if self.recent_decode else 0.0

    @property
    def decode_kv_tokens(self) -> float:
        """KV tokens of the requests decoding now (latest step) plus those queued."""
        if self.last is None:
            return 0.0
        return float(self.last.decode_kv_tokens + self.last.queued_decode_kv_tokens)

    @property
    def queued_prefill_tokens(self) -> float:
        return float(self.last.queued_prefill_tokens) if self.last is not None else 0.0

    @property
    def avg_prefill_tokens_per_step(self) -> float:
        return float(np.mean(self.recent_prefill_tokens)) if self.recent_prefill_tokens else 0.0


@dataclass(frozen=True)
class Traffic:
    """What the load estimates take from the frontend's observations."""

    isl: float
    osl: float
    kv_hit_rate: float = 0.0

    @property
    def decode_len(self) -> float:
        return self.isl + self.osl / 2


@dataclass(frozen=True)
class LoadDecision:
    pool: Pool
    delta: int
    """+1, 0 or -1."""
    ttft_ms: float
    itl_ms: float
    """The worst worker's estimates now (NaN where the pool has no say)."""
    detail: str


@dataclass(frozen=True)
class Limits:
    max_num_batched_tokens: int = 8192
    max_kv_tokens: int = 0
    """0: unknown, the KV-fit check is skipped."""


class LoadModel:
    """The regressions and worker states of one pool."""

    def __init__(
        self, pool: Pool, *, max_samples: int = 64, min_observations: int = 5, limits: Limits = Limits()
    ) -> None:
        self.pool = pool
        self.limits = limits
        factory = {
            Pool.PREFILL: prefill_regression,
            Pool.DECODE: decode_regression,
            Pool.AGGREGATED: aggregated_regression,
        }[pool]
        self.regression = factory(max_samples, min_observations)
        self.workers: dict[int, WorkerLoad] = {}
        self._dirty = False

    def observe(self, sample: StepSample) -> None:
        self.workers.setdefault(sample.worker_id, WorkerLoad(sample.worker_id)).observe(sample)
        if sample.wall_ms <= 0:
            return
        if self.pool is Pool.PREFILL:
            if sample.prefill_tokens <= 0:
                return
            self.regression.add((sample.prefill_tokens,), sample.wall_ms)
        elif self.pool is Pool.DECODE:
            if sample.decode_requests <= 0:
                return
            self.regression.add((sample.decode_requests, sample.decode_kv_tokens), sample.wall_ms)
        else:
            self.regression.add((sample.prefill_tokens, sample.decode_kv_tokens), sample.wall_ms)
        self._dirty = True

    def traffic_hint(self) -> tuple[float, float] | None:
        """Mean prompt tokens computed per prefilling request and mean KV per decoding request, from
        the steps seen: the traffic's shape before the frontends report it (chunked prompts read
        shorter than they are)."""
        prompts = [x for w in self.workers.values() for x in w.recent_prompt_lengths]
        decodes = [x for w in self.workers.values() for x in w.recent_decode_lengths]
        if not prompts or not decodes:
            return None
        return float(np.mean(prompts)), float(np.mean(decodes))

    def forget(self, worker_ids: Iterable[int]) -> None:
        """Drop workers that left (their queues no longer exist)."""
        for worker_id in worker_ids:
            self.workers.pop(worker_id, None)

    def ready(self) -> bool:
        if self._dirty:
            self.regression.fit()
            self._dirty = False
        return self.regression.ready

    # -- estimates (ms) ----------------------------------------------------------------------

    def _step(self, prefill_tokens: float, decode_requests: float, decode_kv: float) -> float:
        r = self.regression
        if self.pool is Pool.PREFILL:
            return r.predict(prefill_tokens)
        if self.pool is Pool.DECODE:
            return r.predict(decode_requests, decode_kv)
        return r.predict(prefill_tokens, decode_kv)

    def ttft_ms(self, queued_tokens: float, traffic: Traffic, decode_kv: float = 0.0) -> float:
        hit = min(MAX_HIT_RATE, max(0.0, traffic.kv_hit_rate))
        tokens = (queued_tokens + traffic.isl) * (1 - hit)
        return chunked(
            tokens, self.limits.max_num_batched_tokens, lambda chunk: self._step(chunk, 0.0, decode_kv)
        )

    def itl_ms(
        self, decode_requests: float, decode_kv: float, traffic: Traffic, prefill_tokens: float = 0.0
    ) -> float:
        return self._step(prefill_tokens, decode_requests + 1, decode_kv + traffic.decode_len)

    def estimates(self, worker: WorkerLoad, traffic: Traffic, share: float = 1.0) -> tuple[float, float]:
        """TTFT and ITL of ``worker`` with its queue and batch scaled by ``share``."""
        ttft = itl = math.nan
        kv = worker.decode_kv_tokens * share
        if self.pool in (Pool.PREFILL, Pool.AGGREGATED):
            ttft = self.ttft_ms(
                worker.queued_prefill_tokens * share, traffic, kv if self.pool is Pool.AGGREGATED else 0.0
            )
        if self.pool in (Pool.DECODE, Pool.AGGREGATED):
            prefill = worker.avg_prefill_tokens_per_step * share if self.pool is Pool.AGGREGATED else 0.0
            itl = self.itl_ms(worker.avg_decode_requests * share, kv, traffic, prefill)
        return ttft, itl

    # -- the decision ------------------------------------------------------------------------

    def decide(
        self, workers: Sequence[int], traffic: Traffic, targets: Targets, sensitivity: float
    ) -> LoadDecision:
        """+1, 0 or -1 for a pool of ``workers`` (ids of its ready workers)."""
        if not self.ready():
            return LoadDecision(
                self.pool, 0, math.nan, math.nan, f"load model not ready: {self.regression.reason}"
            )
        states = [self.workers[w] for w in workers if w in self.workers and self.workers[w].last is not None]
        if not states:
            return LoadDecision(
                self.pool, 0, math.nan, math.nan, "no step metrics from the pool's workers yet"
            )
        now = [self.estimates(s, traffic) for s in states]
        worst_ttft = max((t for t, _ in now if not math.isnan(t)), default=math.nan)
        worst_itl = max((i for _, i in now if not math.isnan(i)), default=math.nan)
        ttft_breach = [not math.isnan(t) and t > targets.ttft_ms for t, _ in now]
        itl_breach = [not math.isnan(i) and i > targets.itl_ms for _, i in now]
        shown = _show(worst_ttft, worst_itl)
        if (any(ttft_breach) and all(ttft_breach)) or (any(itl_breach) and all(itl_breach)):
            return LoadDecision(
                self.pool, 1, worst_ttft, worst_itl, f"every worker over target ({shown}): +1"
            )
        n = len(states)
        if n <= 1:
            return LoadDecision(
                self.pool, 0, worst_ttft, worst_itl, f"within target ({shown}) on the only worker"
            )
        share = n / (n - 1)
        comfortable = sensitivity / 100.0
        for state in states:
            if not self._fits_after_consolidation(state, traffic, targets, share, comfortable):
                return LoadDecision(
                    self.pool, 0, worst_ttft, worst_itl, f"within target ({shown}); one fewer would not be"
                )
        return LoadDecision(
            self.pool,
            -1,
            worst_ttft,
            worst_itl,
            f"with {n - 1} workers still under {sensitivity:g}% of target ({shown}): -1",
        )

    def _fits_after_consolidation(
        self, state: WorkerLoad, traffic: Traffic, targets: Targets, share: float, comfortable: float
    ) -> bool:
        ttft, itl = self.estimates(state, traffic, share)
        if not math.isnan(ttft):
            own = self.ttft_ms(0.0, traffic)
            if ttft - own > (targets.ttft_ms - own) * comfortable:
                return False
        if not math.isnan(itl):
            if itl > targets.itl_ms * comfortable:
                return False
            kv = state.decode_kv_tokens * share + traffic.decode_len
            if self.limits.max_kv_tokens and kv > self.limits.max_kv_tokens:
                return False
        return True


def _show(ttft: float, itl: float) -> str:
    parts = []
    if not math.isnan(ttft):
        parts.append(f"TTFT {ttft:.0f} ms")
    if not math.isnan(itl):
        parts.append(f"ITL {itl:.1f} ms")
    return ", ".join(parts) or "no estimate"


class RegressionPerfModel:
    """The learned regressions seen as a :class:`~tokenyard.planner.perf.PerfModel`, for the
    throughput loop when no profile was given."""

    def __init__(self, models: dict[Pool, LoadModel], limits: Limits, max_num_seqs: int) -> None:
        self._models = models
        self._limits = limits
        self._max_num_seqs = max_num_seqs

    def ready(self) -> bool:
        return bool(self._models) and all(m.ready() for m in self._models.values())

    @property
    def max_kv_tokens(self) -> int:
        return self._limits.max_kv_tokens or 1 << 30

    @property
    def max_num_seqs(self) -> int:
        return self._max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self._limits.max_num_batched_tokens

    def _model(self, *pools: Pool) -> LoadModel:
        for pool in pools:
            if pool in self._models:
                return self._models[pool]
        raise LookupError("no load model for these pools")

    def prefill_ms(self, tokens: float) -> float:
        model = self._model(Pool.PREFILL, Pool.AGGREGATED)
        return chunked(tokens, self.max_num_batched_tokens, lambda chunk: model._step(chunk, 0.0, 0.0))

    def itl_ms(self, concurrency: float, context: float) -> float:
        model = self._model(Pool.DECODE, Pool.AGGREGATED)
        return model._step(0.0, concurrency, concurrency * context)
