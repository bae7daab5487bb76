"""The planner's loops: observe, predict, decide, apply; one decision record per tick.

Two loops share one lock. The throughput loop (every ``throughput_interval_s``) reads the
frontends' counters for the interval, feeds the predictors, and sizes the pools for the
predicted traffic with the perf model (a profile, or the learned regressions once they are
ready). The load loop (every ``load_interval_s``) moves each pool by one from the latency the
learned regressions predict for each worker's current queue. Both end in :meth:`Planner._act`:
unless advisory, a change is handed to the connector as one action, and while that action runs
no new one starts (the tick's record says "deferred").

Bad input never moves replicas: when the frontends cannot be read, the connector cannot report
replicas, or the perf model is missing, the tick keeps the last good decision and its record
says why. A failed or timed-out action is recorded as failed; the next tick decides afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from tokenyard.planner.connectors.base import Connector, ConnectorError
from tokenyard.planner.decide import Outcome, Policy, hold, load_tick, throughput_tick
from tokenyard.planner.load import Limits, LoadDecision, LoadModel, RegressionPerfModel, StepSample, Traffic
from tokenyard.planner.metrics import PlannerMetrics
from tokenyard.planner.observe import Observation, ObservationError
from tokenyard.planner.perf import PerfModel
from tokenyard.planner.pools import Pool
from tokenyard.planner.predictors import Predictor, new_predictor
from tokenyard.planner.records import DecisionRecord, PoolDecision, Reason, State, TickKind, TrafficStats
from tokenyard.planner.throughput import Demand

log = logging.getLogger(__name__)


class ObservationSource(Protocol):
    async def observe(self) -> Observation:
        """The interval since the previous call; raises :class:`ObservationError`."""
        ...


@dataclass(frozen=True)
class PlannerConfig:
    policy: Policy
    throughput_interval_s: float = 180.0
    load_interval_s: float = 5.0
    advisory: bool = False
    predictor: str = "arima"
    action_timeout_s: float = 600.0
    replicas_timeout_s: float = 10.0
    history: int = 1000
    max_samples: int = 64
    min_observations: int = 5
    default_isl: float = 3000.0
    default_osl: float = 150.0
    limits: Limits = field(default_factory=Limits)
    max_num_seqs: int = 256


class Planner:
    def __init__(
        self,
        config: PlannerConfig,
        connector: Connector,
        observations: ObservationSource | None,
        *,
        perf_model: PerfModel | None = None,
        perf_model_error: str = "",
        metrics: PlannerMetrics | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.config = config
        self.policy = config.policy
        self.connector = connector
        self.observations = observations
        self.perf_model = perf_model
        self.perf_model_error = perf_model_error
        self.metrics = metrics
        self._clock = clock
        self.predictors: dict[str, Predictor] = {
            name: new_predictor(config.predictor) for name in ("requests", "isl", "osl")
        }
        self.load_models = {
            pool: LoadModel(
                pool,
                max_samples=config.max_samples,
                min_observations=config.min_observations,
                limits=config.limits,
            )
            for pool in self.policy.mode.pools
        }
        self.records: deque[DecisionRecord] = deque(maxlen=config.history)
        self.latest: dict[Pool, PoolDecision] = {}
        self.last_observation: Observation | None = None
        self.last_prediction = TrafficStats()
        self.lower_bound: dict[Pool, int] = {p: self.policy.minimum(p) for p in self.policy.mode.pools}
        self._last_current: dict[Pool, int] = {}
        self._last_good: DecisionRecord | None = None
        self._decision_id = 0
        self._lock = asyncio.Lock()
        self._action: asyncio.Task[None] | None = None
        self._action_record: DecisionRecord | None = None
        self._failure = ""
        self._scraped = False
        self._limits = config.limits
        self._max_num_seqs = config.max_num_seqs
        if metrics is not None:
            metrics.targets(self.policy.targets.ttft_ms, self.policy.targets.itl_ms)

    # ---- inputs from the step-metrics subscriber ----------------------------------------------

    def observe_step(self, pool: Pool, sample: StepSample) -> None:
        model = self.load_models.get(pool)
        if model is not None:
            model.observe(sample)

    def set_limits(
        self, pool: Pool, max_num_seqs: int, max_num_batched_tokens: int, max_kv_tokens: int
    ) -> None:
        """What a worker said about itself (Describe), for the learned models; a profile's limits win."""
        model = self.load_models.get(pool)
        if model is None or self.perf_model is not None:
            return
        model.limits = Limits(max_num_batched_tokens or model.limits.max_num_batched_tokens, max_kv_tokens)
        self._limits = model.limits
        self._max_num_seqs = max_num_seqs or self._max_num_seqs

    def forget_worker(self, pool: Pool, worker_id: int) -> None:
        model = self.load_models.get(pool)
        if model is not None:
            model.forget([worker_id])

    # ---- state -------------------------------------------------------------------------------

    @property
    def action_in_progress(self) -> bool:
        return self._action is not None and not self._action.done()

    def perf_model_ready(self) -> bool:
        return self._model()[0] is not None

    def _model(self) -> tuple[PerfModel | None, str]:
        if self.perf_model is not None:
            return self.perf_model, ""
        learned = RegressionPerfModel(self.load_models, self._limits, self._max_num_seqs)
        if learned.ready():
            return learned, ""
        reasons = [f"{p.value}: {m.regression.reason}" for p, m in self.load_models.items() if not m.ready()]
        why = (
            self.perf_model_error
            or "no profile, and the learned models are not ready (" + "; ".join(reasons) + ")"
        )
        return None, why

    def _traffic(self) -> Traffic:
        obs = self.last_observation
        pred = self.last_prediction
        isl = pred.isl if math.isfinite(pred.isl) else obs.isl if obs and math.isfinite(obs.isl) else math.nan
        osl = pred.osl if math.isfinite(pred.osl) else obs.osl if obs and math.isfinite(obs.osl) else math.nan
        hit = obs.kv_hit_rate if obs is not None and math.isfinite(obs.kv_hit_rate) else 0.0
        if not (math.isfinite(isl) and math.isfinite(osl)):
            # Before the frontends reported a length: the engines' steps tell the traffic's shape
            # better than a default does; the defaults only serve until the first step.
            hints = [h for h in (m.traffic_hint() for m in self.load_models.values()) if h is not None]
            if hints:
                hint_isl, decode_len = hints[0]
                isl = isl if math.isfinite(isl) else hint_isl
                osl = osl if math.isfinite(osl) else max(1.0, 2 * (decode_len - isl))
        return Traffic(
            isl if math.isfinite(isl) else self.config.default_isl,
            osl if math.isfinite(osl) else self.config.default_osl,
            hit,
        )

    def _predict(self, obs: Observation) -> tuple[float, float, float]:
        """Feed the interval to the predictors; their forecasts of (request count, ISL, OSL)."""
        p = self.predictors
        p["requests"].add(obs.requests)
        p["isl"].add(obs.isl)
        p["osl"].add(obs.osl)
        return p["requests"].predict(), p["isl"].predict(), p["osl"].predict()

    def _new_record(self, kind: TickKind) -> DecisionRecord:
        self._decision_id += 1
        return DecisionRecord(self._decision_id, self._clock(), kind)

    async def _current(self) -> dict[Pool, int]:
        try:
            found = await asyncio.wait_for(self.connector.current_replicas(), self.config.replicas_timeout_s)
        except TimeoutError:
            raise ConnectorError(
                f"{self.connector.name()} connector did not report replicas within {self.config.replicas_timeout_s:g}s"
            ) from None
        current = {pool: found.get(pool, 0) for pool in self.policy.mode.pools}
        self._last_current = current
        return current

    def _keep_last_good(self, record: DecisionRecord, why: str) -> DecisionRecord:
        """A tick that could not decide: the last good decision stands, and the record says why."""
        last = self._last_good
        current = self._last_current
        if last is not None:
            desired = last.desired()
            note = f"{why}; keeping decision {last.decision_id}"
        else:
            desired = {}
            note = f"{why}; no decision yet, holding"
        record.pools = [
            PoolDecision(
                pool,
                current.get(pool, 0),
                desired.get(pool, current.get(pool, 0)),
                Reason.LAST_GOOD,
                State.UNCHANGED,
                detail=note,
            )
            for pool in self.policy.mode.pools
        ]
        record.summary = note
        return record

    # ---- ticks -------------------------------------------------------------------------------

    async def throughput_tick(self) -> DecisionRecord:
        async with self._lock:
            record = self._new_record(TickKind.THROUGHPUT)
            try:
                current = await self._current()
            except ConnectorError as exc:
                return self._finish(self._keep_last_good(record, f"cannot read replicas: {exc}"), act=False)
            if self.observations is None:
                return self._finish(self._keep_last_good(record, "no observation source"), act=False)
            try:
                obs = await self.observations.observe()
            except ObservationError as exc:
                return self._finish(
                    self._keep_last_good(record, f"frontend metrics unusable: {exc}"), act=False
                )
            self._scraped = True
            if math.isnan(obs.requests):
                outcome = Outcome(
                    hold(self.policy, current, "first scrape: counting from now"),
                    "first scrape",
                    self.lower_bound,
                )
                return self._finish(self._apply_outcome(record, outcome))
            self.last_observation = obs
            record.observed = TrafficStats(obs.request_rate, obs.isl, obs.osl, obs.kv_hit_rate)
            record.observed_ttft_ms, record.observed_itl_ms = obs.ttft_ms, obs.itl_ms
            # ARIMA refits take up to a second of CPU: off the event loop, which serves RPCs.
            count, isl, osl = await asyncio.to_thread(self._predict, obs)
            hit = obs.kv_hit_rate if math.isfinite(obs.kv_hit_rate) else 0.0
            rate = count / obs.interval_s if math.isfinite(count) else math.nan
            self.last_prediction = record.predicted = TrafficStats(rate, isl, osl, hit)
            demand = Demand(rate, isl, osl, hit) if all(math.isfinite(v) for v in (rate, isl, osl)) else None
            model, why_not = self._model()
            outcome = throughput_tick(self.policy, model, demand, current, why_not)
            self.lower_bound = outcome.lower_bound
            return self._finish(self._apply_outcome(record, outcome))

    async def load_tick(self) -> DecisionRecord:
        async with self._lock:
            record = self._new_record(TickKind.LOAD)
            try:
                current = await self._current()
            except ConnectorError as exc:
                return self._finish(self._keep_last_good(record, f"cannot read replicas: {exc}"), act=False)
            traffic = self._traffic()
            loads: dict[Pool, LoadDecision] = {
                pool: model.decide(
                    list(model.workers), traffic, self.policy.targets, self.policy.load_sensitivity
                )
                for pool, model in self.load_models.items()
            }
            outcome = load_tick(self.policy, loads, current, self.lower_bound)
            return self._finish(self._apply_outcome(record, outcome))

    def _apply_outcome(self, record: DecisionRecord, outcome: Outcome) -> DecisionRecord:
        record.pools = outcome.decisions
        record.summary = outcome.summary
        record.gpus = self.policy.budget.total(record.desired())
        return record

    def _finish(self, record: DecisionRecord, act: bool = True) -> DecisionRecord:
        if act:
            self._act(record)
        if self._failure:
            record.summary = f"{record.summary}; last action failed: {self._failure}"
            self._failure = ""
        self.records.append(record)
        for p in record.pools:
            self.latest[p.pool] = p
        if self.metrics is not None:
            self.metrics.record(record)
            self.metrics.action_in_progress.set(1 if self.action_in_progress else 0)
        log.info("%s", record.log_line())
        return record

    def _act(self, record: DecisionRecord) -> None:
        if any(p.reason is Reason.GPU_BUDGET and p.desired == 0 for p in record.pools):
            record.set_state(State.FAILED)
            return
        changed = any(p.desired != p.current for p in record.pools)
        if not changed:
            for p in record.pools:
                p.state = State.UNCHANGED
            self._last_good = record
            return
        if self.config.advisory:
            for p in record.pools:
                p.state = State.ADVISORY if p.desired != p.current else State.UNCHANGED
            self._last_good = record
            return
        if self.action_in_progress:
            assert self._action_record is not None
            for p in record.pools:
                p.state = State.DEFERRED if p.desired != p.current else State.UNCHANGED
            record.summary += (
                f"; not applied: decision {self._action_record.decision_id} is still being applied"
            )
            return
        for p in record.pools:
            p.state = State.PENDING if p.desired != p.current else State.UNCHANGED
        self._action_record = record
        self._action = asyncio.create_task(self._run_action(record), name=f"scale-{record.decision_id}")

    async def _run_action(self, record: DecisionRecord) -> None:
        target = record.desired()
        name = self.connector.name()
        try:
            await asyncio.wait_for(
                self.connector.scale(target, record.decision_id), self.config.action_timeout_s
            )
        except (ConnectorError, TimeoutError) as exc:
            text = str(exc) or f"timed out after {self.config.action_timeout_s:g}s"
            if isinstance(exc, TimeoutError):
                text = f"{name} connector did not finish within {self.config.action_timeout_s:g}s"
            for p in record.pools:
                if p.state is State.PENDING:
                    p.state = State.FAILED
            record.summary += f"; action failed: {text}"
            self._failure = f"decision {record.decision_id}: {text}"
            log.warning("decision %d could not be applied: %s", record.decision_id, text)
            if self.metrics is not None:
                self.metrics.actions.labels(name, "failed").inc()
        except Exception:
            for p in record.pools:
                if p.state is State.PENDING:
                    p.state = State.FAILED
            self._failure = f"decision {record.decision_id}: internal error in the {name} connector"
            log.exception("decision %d: the %s connector failed", record.decision_id, name)
            if self.metrics is not None:
                self.metrics.actions.labels(name, "failed").inc()
        else:
            for p in record.pools:
                if p.state is State.PENDING:
                    p.state = State.APPLIED
            self._last_good = record
            log.info("decision %d applied: %s", record.decision_id, target)
            if self.metrics is not None:
                self.metrics.actions.labels(name, "applied").inc()
        finally:
            if self.metrics is not None:
                self.metrics.action_in_progress.set(0)

    async def wait_for_action(self) -> None:
        """Until the action in progress (if any) ends (tests, shutdown)."""
        if self._action is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._action)

    # ---- the loops ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick forever: throughput every interval (the first at once), load in between."""
        loop = asyncio.get_running_loop()
        policy = self.policy
        next_tp = loop.time()
        next_load = loop.time() + self.config.load_interval_s
        while True:
            now = loop.time()
            if policy.throughput_enabled and now >= next_tp:
                await self._safely(self.throughput_tick)
                # Until a first scrape succeeded (the frontends may start after the planner), retry
                # soon, so that the first observed interval is not a whole interval late.
                wait = self.config.throughput_interval_s if self._scraped else self.config.load_interval_s
                next_tp = now + min(wait, self.config.throughput_interval_s)
            elif policy.load_enabled and now >= next_load:
                await self._safely(self.load_tick)
                next_load = now + self.config.load_interval_s
            candidates = [next_tp] if policy.throughput_enabled else []
            if policy.load_enabled:
                candidates.append(next_load)
            if not candidates:
                return
            await asyncio.sleep(max(0.0, min(candidates) - loop.time()))

    async def _safely(self, tick: Callable[[], Awaitable[DecisionRecord]]) -> None:
        try:
            await tick()
        except Exception:
            # A bug in one tick must not end the planner; the next tick tries again.
            log.exception("planner tick failed")

    async def close(self) -> None:
        if self._action is not None and not self._action.done():
            self._action.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._action
        await self.connector.close()
