"""The routing decision: eligible worker ranks, busy filtering, overlap and load, a policy's choice,
and the request's lifecycle (recorded as active until its end).

Errors (domain classes; the gRPC status in brackets, the frontend's HTTP status after it):

* no worker is eligible: :class:`Unavailable` [UNAVAILABLE, 503], whether no worker serves the
  model right now or the pool, allow-list, pin or rank leave none. Never NOT_FOUND: a router
  that has not yet seen (or no longer sees) a model's workers cannot tell an unknown model from
  a transient gap; the frontend, which owns the model list, answers 404;
* eligible workers exist but every one is busy: :class:`Overloaded` [RESOURCE_EXHAUSTED, 529]
  (the router's queue, :mod:`tokenyard.router.route_queue`, waits for capacity first).

Besides the index and the active requests, the decision consults what it learned from its own
decisions: a forecast of what each rank's cache keeps (:mod:`tokenyard.router.index.recency`,
for the kv mode's cache-pressure terms) and the session table (:mod:`tokenyard.router.sessions`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenyard.common.errors import InvalidArgument, Overloaded, Unavailable
from tokenyard.router.active import ActiveRequests, Outcome, routed_request
from tokenyard.router.busy import BusyThresholds, RankPressure, worker_busy
from tokenyard.router.index import InvalidEvent, Prompt, WorkerRank
from tokenyard.router.index.approx import ApproximateRecorder
from tokenyard.router.index.recency import KeepForecast
from tokenyard.router.index.tiers import Tier, TieredIndex
from tokenyard.router.metrics import RouterMetrics
from tokenyard.router.policies import Candidate, RoutingContext, RoutingMode, RoutingPolicy, make_policy
from tokenyard.router.policies.cost import CostKnobs, RankState, overflow_blocks
from tokenyard.router.replication.replicas import FirstToken, Freed, LifecycleEvent, Routed
from tokenyard.router.sessions import MAX_SESSION_ID, SessionTable
from tokenyard.router.workers import LoadReport, WorkerSet, WorkerState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouteHints:
    """Per-request adjustments; None keeps the router's configuration."""

    mode: str | None = None
    overlap_score_credit: float | None = None
    prefill_load_scale: float | None = None
    temperature: float | None = None
    pinned_worker_id: int | None = None
    allowed_worker_ids: frozenset[int] = frozenset()
    dp_rank: int | None = None
    expected_output_tokens: int | None = None
    priority: int = 0
    # A conversation's id ("" none): its turns follow the worker holding its history.
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class RouteQuery:
    request_id: str
    model: str
    # Local hashes of the prompt's complete blocks (salted), in order.
    local_hashes: Sequence[int]
    isl_tokens: int
    # The same blocks' sequence hashes when the caller has them.
    sequence_hashes: Sequence[int] | None = None
    # "" (the client-facing pool), "aggregated", "prefill" or "decode".
    pool: str = ""
    hints: RouteHints = field(default_factory=RouteHints)
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class RouteDecision:
    worker_id: int
    dp_rank: int
    address: str
    overlap_blocks: int
    cached_tokens: int
    block_size: int
    cost: float
    mode: str
    # The chosen rank's load before this request (the larger of prediction and fresh report) and
    # capacity (0: unknown), for callers that decide on load.
    active_prefill_tokens: int = 0
    active_decode_blocks: int = 0
    total_kv_blocks: int = 0
    max_num_batched_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RouterConfig:
    default_mode: str = "kv"
    knobs: CostKnobs = field(default_factory=CostKnobs)
    busy: BusyThresholds = field(default_factory=BusyThresholds)
    # Worker load reports older than this are ignored (seconds).
    load_report_max_age: float = 10.0


class Scheduler:
    def __init__(
        self,
        workers: WorkerSet,
        index: TieredIndex,
        active: ActiveRequests,
        config: RouterConfig | None = None,
        *,
        approx: ApproximateRecorder | None = None,
        predicted: ApproximateRecorder | None = None,
        metrics: RouterMetrics | None = None,
        rng: random.Random | None = None,
        publish: Callable[[LifecycleEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sessions: SessionTable | None = None,
    ) -> None:
        self.workers = workers
        self.index = index
        self.active = active
        self.config = config or RouterConfig()
        self.approx = approx
        self.predicted = predicted
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._publish = publish
        self._clock = clock
        self._policies: dict[str, RoutingPolicy] = {}
        self.policy(self.config.default_mode)
        self.forecast = KeepForecast(self._rank_capacity)
        index.on_device_cleared.append(self.forecast.forget)
        self.sessions = sessions if sessions is not None else SessionTable(clock=clock)
        # Called when load is released (a first token, a request's end): the router queue retries.
        self.on_release: list[Callable[[], None]] = []

    def policy(self, mode: str) -> RoutingPolicy:
        policy = self._policies.get(mode)
        if policy is None:
            try:
                policy = self._policies[mode] = make_policy(mode, self._rng)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        return policy

    def _rank_capacity(self, rank: WorkerRank) -> int:
        return self._capacity(self.workers.get(rank.worker_id), rank.dp_rank)[0]

    # -- routing --------------------------------------------------------------------------------

    def route(self, query: RouteQuery, *, count_overloaded: bool = True) -> RouteDecision:
        """Choose a worker rank and record the request (see the module's docstring for errors);
        ``count_overloaded`` False leaves an :class:`Overloaded` out of the rejection metric (the
        queue counts its own refusals)."""
        try:
            return self._route(query)
        except (Unavailable, Overloaded, InvalidArgument) as exc:
            if self.metrics is not None and (count_overloaded or not isinstance(exc, Overloaded)):
                reason = {Unavailable: "unavailable", Overloaded: "overloaded"}.get(type(exc), "invalid")
                self.metrics.rejections.labels(reason).inc()
            raise

    def _route(self, q: RouteQuery) -> RouteDecision:
        t0 = time.perf_counter()
        hints = q.hints
        _validate(q)
        mode = hints.mode or self.config.default_mode
        policy = self.policy(mode)
        if mode == RoutingMode.DIRECT and hints.pinned_worker_id is None:
            raise InvalidArgument("routing mode direct needs pinned_worker_id")
        knobs = self.config.knobs.with_overrides(
            hints.overlap_score_credit, hints.prefill_load_scale, hints.temperature
        ).for_pool(q.pool)

        workers = self._eligible_workers(q)
        if not q.dry_run and self.active.get(q.request_id) is not None:
            # A migration: the previous assignment stops counting before the new one is scored.
            self._finish(q.request_id, publish=True)

        prompt = Prompt(q.local_hashes, q.sequence_hashes or None)
        chain = prompt.chain
        t1 = time.perf_counter()
        overlaps = self.index.find_matches(prompt) if len(prompt) else {}
        if self.predicted is not None and len(prompt):
            # Predict-on-route: what this router just sent somewhere counts as cached there
            # until the worker's own events catch up (the best of both, never the sum).
            device = overlaps.setdefault(Tier.DEVICE, {})
            for rank, n in self.predicted.index.find_matches(prompt).items():
                if n > device.get(rank, 0):
                    device[rank] = n
        active_overlap = self.active.overlap(chain) if len(prompt) else {}
        t2 = time.perf_counter()

        block_size = workers[0].block_size or 1
        isl = q.isl_tokens or len(prompt) * block_size
        # This request's own output, when it says how long (future decode load, kv mode).
        output_blocks = (hints.expected_output_tokens or 0) / block_size
        ctx = RoutingContext(isl, block_size, -(-isl // block_size), knobs, output_blocks)
        pressure = chain if getattr(policy, "uses_pressure", False) else None
        session = self._session_rank(q, workers, mode)
        session_outcome = "placed"
        candidates: list[Candidate] = []
        if session is not None:
            home = [w for w in workers if w.worker_id == session.worker_id]
            candidates = self._candidates(home, session.dp_rank, overlaps, active_overlap, ctx, pressure)
            session_outcome = "followed"
            if candidates and overflow_blocks(candidates[0].state, ctx.request_blocks, output_blocks) > 0:
                # Its history's rank cannot hold this turn beside its running requests (the kv
                # mode's forecast of its capacity): the turn would wait there, or preempt one.
                # Busy, then: routed as usual, and the session moves with it.
                candidates, session_outcome = [], "moved"
        if not candidates:
            candidates = self._candidates(workers, hints.dp_rank, overlaps, active_overlap, ctx, pressure)
        chosen = policy.select(candidates, ctx)
        t3 = time.perf_counter()

        overlap = chosen.state.device_overlap
        cached_tokens = min(isl, overlap * block_size)
        if not q.dry_run:
            self.active.add(
                routed_request(
                    q.request_id,
                    chosen.worker_id,
                    chosen.dp_rank,
                    isl,
                    cached_tokens,
                    chain,
                    q.pool,
                    expected_output_tokens=hints.expected_output_tokens,
                )
            )
            chosen_rank = WorkerRank(chosen.worker_id, chosen.dp_rank)
            self.forecast.touch(chosen_rank, chain)
            if hints.session_id:
                self.sessions.bind(hints.session_id, chosen_rank)
            for recorder in (self.approx, self.predicted):
                if recorder is not None and len(prompt):
                    try:
                        recorder.record(WorkerRank(chosen.worker_id, chosen.dp_rank), prompt)
                    except InvalidEvent as exc:  # the index holds this rank's blocks under other hashes
                        log.debug("recording the decision skipped: %s", exc)
            if self._publish is not None:
                self._publish(
                    Routed(
                        q.request_id,
                        chosen.worker_id,
                        chosen.dp_rank,
                        chain,
                        isl,
                        cached_tokens,
                        hints.expected_output_tokens,
                        q.pool,
                        hints.session_id or "",
                    )
                )
        chosen_worker = self.workers.get(chosen.worker_id)
        if self.metrics is not None:
            self._observe(policy.name(), candidates, overlap, len(prompt), isl, (t0, t1, t2, t3))
            if chosen_worker is not None:
                self.metrics.pool_decision(chosen_worker.role)
            if hints.session_id:
                self.metrics.session_routes.labels(session_outcome).inc()
            if getattr(policy, "uses_pressure", False):
                self.metrics.evicted_hot_blocks.observe(chosen.state.evicted_hot_blocks)
        total_blocks, max_batched = self._capacity(chosen_worker, chosen.dp_rank)
        return RouteDecision(
            worker_id=chosen.worker_id,
            dp_rank=chosen.dp_rank,
            address=chosen.address,
            overlap_blocks=overlap,
            cached_tokens=cached_tokens,
            block_size=block_size,
            cost=chosen.cost,
            mode=policy.name(),
            active_prefill_tokens=int(chosen.state.active_prefill_tokens),
            active_decode_blocks=int(chosen.state.active_blocks),
            total_kv_blocks=total_blocks,
            max_num_batched_tokens=max_batched,
        )

    def _session_rank(self, q: RouteQuery, workers: list[WorkerState], mode: str) -> WorkerRank | None:
        """The rank holding the session's history, if it is still eligible (not busy: busy
        workers are no longer among ``workers``) and the request does not pin another."""
        sid = q.hints.session_id
        if not sid or mode == RoutingMode.DIRECT:
            return None
        rank = self.sessions.get(sid)
        if rank is None or (q.hints.dp_rank is not None and q.hints.dp_rank != rank.dp_rank):
            return None
        for w in workers:
            if w.worker_id == rank.worker_id and rank.dp_rank < w.dp_size:
                return rank
        return None

    def check(self, q: RouteQuery) -> None:
        """Raise what :meth:`route` would for ``q``, except that every worker is busy (a request
        about to wait in the queue learns at once that it is malformed or has no worker)."""
        try:
            _validate(q)
            mode = q.hints.mode or self.config.default_mode
            self.policy(mode)
            if mode == RoutingMode.DIRECT and q.hints.pinned_worker_id is None:
                raise InvalidArgument("routing mode direct needs pinned_worker_id")
            self._eligible_workers(q, skip_busy=False)
        except (Unavailable, InvalidArgument) as exc:
            if self.metrics is not None:
                self.metrics.rejections.labels(
                    "unavailable" if isinstance(exc, Unavailable) else "invalid"
                ).inc()
            raise

    def _capacity(self, w: WorkerState | None, rank: int) -> tuple[int, int]:
        """(device KV blocks, prompt tokens per step) of a worker rank; 0 where unknown."""
        if w is None:
            return 0, 0
        report = self._fresh(w.loads.get(rank))
        total = report.total_blocks if report is not None and report.total_blocks else w.total_kv_blocks
        return total, w.details.max_num_batched_tokens if w.details is not None else 0

    def _eligible_workers(self, q: RouteQuery, *, skip_busy: bool = True) -> list[WorkerState]:
        hints = q.hints
        workers = self.workers.for_model(q.model, q.pool)
        if not workers:
            if not self.workers.serves(q.model):
                raise Unavailable(f"no worker serves model {q.model!r}")
            raise Unavailable(f"no worker of model {q.model!r} is in the {q.pool or 'serving'} pool")
        if hints.allowed_worker_ids:
            workers = [w for w in workers if w.worker_id in hints.allowed_worker_ids]
        if hints.pinned_worker_id is not None:
            workers = [w for w in workers if w.worker_id == hints.pinned_worker_id]
        if hints.dp_rank is not None:
            workers = [w for w in workers if hints.dp_rank < w.dp_size]
        if not workers:
            raise Unavailable(f"no worker of model {q.model!r} is eligible (allowed, pinned or dp_rank)")
        busy = self.config.busy
        if busy.enabled and skip_busy:
            free = [w for w in workers if not worker_busy(self._pressures(w), busy)]
            if not free:
                raise Overloaded(f"all {len(workers)} eligible workers of model {q.model!r} are busy")
            workers = free
        return workers

    def _fresh_since(self) -> float:
        """Load reports received before this time are stale (ignored)."""
        return self._clock() - self.config.load_report_max_age

    def _fresh(self, report: LoadReport | None) -> LoadReport | None:
        if report is None or report.received_at < self._fresh_since():
            return None
        return report

    def _pressures(self, w: WorkerState) -> list[RankPressure]:
        out = []
        details = w.details
        for rank in range(w.dp_size):
            load = self.active.load(w.worker_id, rank)
            report = self._fresh(w.loads.get(rank))
            out.append(
                RankPressure(
                    decode_blocks=max(load.active_blocks, report.active_blocks if report else 0),
                    total_blocks=(
                        report.total_blocks if report and report.total_blocks else w.total_kv_blocks
                    ),
                    prefill_tokens=max(
                        load.active_prefill_tokens, report.active_prefill_tokens if report else 0
                    ),
                    max_batched_tokens=details.max_num_batched_tokens if details else 0,
                )
            )
        return out

    def _candidates(
        self,
        workers: list[WorkerState],
        dp_rank: int | None,
        overlaps: dict[Tier, dict[WorkerRank, int]],
        active_overlap: dict[WorkerRank, int],
        ctx: RoutingContext,
        pressure_chain: Sequence[int] | None,
    ) -> list[Candidate]:
        """One candidate per eligible rank with what the cost function needs; with
        ``pressure_chain`` (the prompt's chain, for the kv mode) also the cache-pressure forecast.

        Runs for every rank of every decision (64 and more), so it reads each source once per
        decision and keeps names local: it is most of a decision's cost."""
        device = overlaps.get(Tier.DEVICE, {})
        host = overlaps.get(Tier.HOST_PINNED, {})
        disk = overlaps.get(Tier.DISK, {})
        external = overlaps.get(Tier.EXTERNAL, {})
        loads = self.active.loads()
        forecasts = self.forecast.ranks if pressure_chain is not None else {}
        fresh_since = self._fresh_since()
        bs = ctx.block_size
        own = ctx.request_blocks + ctx.output_blocks
        out: list[Candidate] = []
        for w in workers:
            keys = w.rank_keys()
            if dp_rank is not None:
                if dp_rank >= len(keys):
                    continue
                keys = keys[dp_rank : dp_rank + 1]
            address = w.instance.address
            reports = w.loads
            for key in keys:
                state = RankState(
                    device_overlap=device.get(key, 0),
                    host_overlap=host.get(key, 0) if host else 0,
                    disk_overlap=disk.get(key, 0) if disk else 0,
                    external_overlap=external.get(key, 0) if external else 0,
                    active_overlap=active_overlap.get(key, 0),
                )
                load = loads.get(key)
                if load is not None:
                    state.active_prefill_tokens = load.active_prefill_tokens
                    state.active_blocks = load.active_blocks
                    state.active_requests = load.active_requests
                    # What the active requests said they will generate (the kv mode's decode term).
                    state.output_blocks = (
                        load.expected_output_tokens / bs if pressure_chain is not None else 0.0
                    )
                report = reports.get(key.dp_rank) if reports else None
                if report is not None and report.received_at >= fresh_since:  # as in _fresh
                    # The larger of the router's prediction and the worker's fresh report.
                    if report.active_prefill_tokens > state.active_prefill_tokens:
                        state.active_prefill_tokens = report.active_prefill_tokens
                    if report.active_blocks > state.active_blocks:
                        state.active_blocks = report.active_blocks
                    reported = report.running_requests + report.waiting_requests
                    if reported > state.active_requests:
                        state.active_requests = reported
                f = forecasts.get(key) if forecasts else None
                if f is not None:
                    assert pressure_chain is not None
                    state.capacity_blocks = f.capacity
                    overlap = state.device_overlap
                    if overlap and f.gone:
                        state.doomed_overlap = doomed = f.doomed(pressure_chain, overlap)
                        overlap -= doomed
                    state.evicted_hot_blocks = f.evicted_hot(own - overlap)
                out.append(Candidate(key.worker_id, key.dp_rank, address, state))
        return out

    def learn_from_peer(self, event: Routed) -> None:
        """A peer router's decision, beyond the load it adds (which the active-request tracking
        applies): the worker it chose now holds the prompt's blocks most recently (the keep
        forecast), and the request's session follows it there."""
        rank = WorkerRank(event.worker_id, event.dp_rank)
        if event.sequence_hashes:
            self.forecast.touch(rank, event.sequence_hashes)
        if event.session_id:
            self.sessions.bind(event.session_id, rank)

    def _observe(
        self,
        mode: str,
        candidates: list[Candidate],
        overlap: int,
        blocks: int,
        isl: int,
        marks: tuple[float, float, float, float],
    ) -> None:
        m = self.metrics
        assert m is not None
        t0, t1, t2, t3 = marks
        m.decisions.labels(mode).inc()
        m.stage("hashing", t1 - t0)
        m.stage("index_lookup", t2 - t1)
        m.stage("scoring", t3 - t2)
        m.stage("total", time.perf_counter() - t0)
        m.input_tokens.observe(isl)
        if blocks:
            m.kv_hit_rate.observe(overlap / blocks)
            best = max(c.state.device_overlap for c in candidates)
            if best > overlap:
                m.non_max_overlap.inc()
            m.overlap_blocks_lost.observe(best - overlap)

    # -- lifecycle ------------------------------------------------------------------------------

    def first_token(self, request_id: str) -> bool:
        req = self.active.get(request_id)
        if req is None or not self.active.first_token(request_id):
            return False
        if self.metrics is not None and not req.origin:
            self.metrics.time_to_first_token.observe(max(0.0, self._clock() - req.started_at))
        if self._publish is not None:
            self._publish(FirstToken(request_id))
        self._released()
        return True

    def _released(self) -> None:
        for listener in self.on_release:
            listener()

    def finish(self, request_id: str, outcome: Outcome = Outcome.FINISHED) -> bool:
        return self._finish(request_id, publish=True, outcome=outcome)

    def _finish(self, request_id: str, *, publish: bool, outcome: Outcome = Outcome.FINISHED) -> bool:
        req = self.active.get(request_id)
        if req is None or not self.active.finish(request_id, outcome):
            return False
        # The engine releases the request's blocks now: their place in its LRU order.
        self.forecast.release(req.rank, req.block_hashes)
        if publish and self._publish is not None:
            self._publish(Freed(request_id))
        self._released()
        return True

    def forget_worker(self, worker_id: int) -> None:
        """A worker left: its index entries, predicted load and approximate records go."""
        self.index.remove_worker(worker_id)
        self.active.drop_worker(worker_id)
        self.forecast.forget_worker(worker_id)
        self.sessions.forget_worker(worker_id)
        for recorder in (self.approx, self.predicted):
            if recorder is not None:
                recorder.remove_worker(worker_id)
                recorder.index.remove_worker(worker_id)


def _validate(q: RouteQuery) -> None:
    if not q.request_id:
        raise InvalidArgument("request_id must be set")
    if not q.model:
        raise InvalidArgument("model must be set")
    if q.sequence_hashes and len(q.sequence_hashes) != len(q.local_hashes):
        raise InvalidArgument(
            f"sequence_hashes must be empty or as many as block_hashes "
            f"({len(q.sequence_hashes)} != {len(q.local_hashes)})"
        )
    h = q.hints
    if len(h.session_id) > MAX_SESSION_ID:
        raise InvalidArgument(f"hints.session_id is longer than {MAX_SESSION_ID} characters")
    for name in ("overlap_score_credit", "prefill_load_scale", "temperature"):
        value = getattr(h, name)
        if value is not None and not value >= 0.0:
            raise InvalidArgument(f"hints.{name} must be >= 0, got {value}")
