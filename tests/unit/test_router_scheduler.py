"""The routing decision end to end in the domain: eligibility, busy detection, modes, lifecycle."""

from __future__ import annotations

import collections
import random
from typing import Any

import pytest

from tokenyard.common.discovery import Instance, ModelCard, WatchEventKind
from tokenyard.common.errors import InvalidArgument, Overloaded, Unavailable
from tokenyard.common.hashing import sequence_hashes
from tokenyard.router.active import ActiveRequests
from tokenyard.router.busy import BusyThresholds
from tokenyard.router.index import Prompt, WorkerRank, make_index
from tokenyard.router.index.approx import ApproximateRecorder
from tokenyard.router.index.tiers import Tier, TieredIndex
from tokenyard.router.metrics import RouterMetrics
from tokenyard.router.policies.cost import CostKnobs
from tokenyard.router.replication.replicas import FirstToken, Freed, LifecycleEvent, Routed
from tokenyard.router.scheduler import RouteDecision, RouteHints, RouteQuery, RouterConfig, Scheduler
from tokenyard.router.workers import LoadReport, WorkerDetails, WorkerSet

pytestmark = pytest.mark.unit

BS = 16
MODEL = "m"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def worker(wid: int, role: str = "aggregated", model: str = MODEL, total_blocks: int = 100) -> Instance:
    card = ModelCard(model, "tok", BS, 4096, total_blocks, "mocker", role)
    return Instance(
        instance_id=wid, service="worker", role=role, address=f"127.0.0.1:{9000 + wid}", model_card=card
    )


class Env:
    def __init__(
        self, n: int = 3, config: RouterConfig | None = None, approx: bool = False, predicted: bool = False
    ) -> None:
        self.clock = Clock()
        self.workers = WorkerSet()
        for wid in range(1, n + 1):
            self.workers.apply(WatchEventKind.ADDED, worker(wid))
        self.index = TieredIndex(lambda: make_index("positional", jump=4))
        self.active = ActiveRequests(clock=self.clock)
        self.metrics = RouterMetrics()
        self.events: list[LifecycleEvent] = []
        self.approx = ApproximateRecorder(self.index.device, ttl=10, clock=self.clock) if approx else None
        self.predicted = (
            ApproximateRecorder(make_index("positional"), ttl=2, clock=self.clock) if predicted else None
        )
        self.scheduler = Scheduler(
            self.workers,
            self.index,
            self.active,
            config,
            approx=self.approx,
            predicted=self.predicted,
            metrics=self.metrics,
            rng=random.Random(0),
            publish=self.events.append,
            clock=self.clock,
        )
        self._ids = 0

    def cache(self, wid: int, locals_: list[int], tier: Tier = Tier.DEVICE, rank: int = 0) -> None:
        self.index.tier(tier).store(WorkerRank(wid, rank), None, sequence_hashes(locals_), locals_)

    def route(self, locals_: list[int], *, rid: str | None = None, **kw: Any) -> tuple[str, RouteDecision]:
        self._ids += 1
        rid = rid or f"r{self._ids}"
        hints = kw.pop("hints", RouteHints())
        model = kw.pop("model", MODEL)
        q = RouteQuery(rid, model, locals_, kw.pop("isl", len(locals_) * BS), hints=hints, **kw)
        return rid, self.scheduler.route(q)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return value or 0.0


PROMPT = list(range(100, 108))


def test_kv_mode_prefers_the_worker_holding_the_prefix() -> None:
    env = Env()
    env.cache(2, PROMPT[:6])
    env.cache(3, PROMPT[:2])
    rid, d = env.route(PROMPT)
    assert (d.worker_id, d.overlap_blocks, d.cached_tokens, d.mode, d.block_size) == (2, 6, 6 * BS, "kv", BS)
    assert d.address == "127.0.0.1:9002"
    load = env.active.load(2)
    assert (load.active_requests, load.active_prefill_tokens, load.active_blocks) == (1, 2 * BS, 8)
    assert env.sample("tokenyard_router_decisions_total", {"mode": "kv"}) == 1
    assert env.sample("tokenyard_router_kv_hit_rate_sum") == pytest.approx(6 / 8)
    assert isinstance(env.events[0], Routed) and env.events[0].request_id == rid


def test_lifecycle_steps_apply_once_and_publish() -> None:
    env = Env()
    rid, d = env.route(PROMPT)
    assert env.scheduler.first_token(rid) and not env.scheduler.first_token(rid)
    assert env.active.load(d.worker_id).active_prefill_tokens == 0
    assert env.scheduler.finish(rid) and not env.scheduler.finish(rid)
    assert len(env.active) == 0
    assert [type(e) for e in env.events] == [Routed, FirstToken, Freed]
    assert env.sample("tokenyard_router_time_to_first_token_seconds_count") == 1


def test_rerouting_an_active_request_frees_the_first_assignment() -> None:
    env = Env(n=2)
    rid, first = env.route(PROMPT)
    _, second = env.route(
        PROMPT, rid=rid, hints=RouteHints(allowed_worker_ids=frozenset({3 - first.worker_id}))
    )
    assert second.worker_id != first.worker_id
    assert env.active.load(first.worker_id).active_requests == 0
    assert env.active.load(second.worker_id).active_requests == 1
    assert len(env.active) == 1


def test_dry_run_records_nothing() -> None:
    env = Env()
    rid, _ = env.route(PROMPT, dry_run=True)
    assert len(env.active) == 0 and env.events == []
    assert not env.scheduler.first_token(rid)


def test_shared_prefix_adds_no_decode_blocks_on_the_same_worker() -> None:
    env = Env(n=2, config=RouterConfig(knobs=CostKnobs(track_prefill_tokens=False)))
    _, first = env.route(PROMPT)
    # Without prefill tracking, cost = active blocks + new blocks: the worker already holding the
    # prompt's 8 blocks costs 8 + 0, the idle one 0 + 8: a tie, never a penalty for sharing.
    _, second = env.route(PROMPT)
    load = env.active.load(first.worker_id)
    if second.worker_id == first.worker_id:
        assert load.active_blocks == 8 and load.active_requests == 2
    assert second.cost == 8.0


def test_predicted_load_spreads_identical_cold_requests() -> None:
    env = Env(n=4)
    chosen = collections.Counter(env.route([i * 1000 + j for j in range(4)])[1].worker_id for i in range(8))
    assert sorted(chosen.values()) == [2, 2, 2, 2]


def test_ties_spread_across_workers() -> None:
    env = Env(n=4)
    chosen: collections.Counter[int] = collections.Counter()
    for i in range(400):
        rid, d = env.route([i])
        chosen[d.worker_id] += 1
        env.scheduler.finish(rid)
    assert set(chosen) == {1, 2, 3, 4}
    assert min(chosen.values()) > 60, chosen


def test_no_eligible_worker_is_unavailable() -> None:
    env = Env()
    with pytest.raises(Unavailable, match="no worker serves"):
        env.route(PROMPT, model="other")
    with pytest.raises(Unavailable, match="no worker"):
        env.route(PROMPT, pool="prefill")
    with pytest.raises(Unavailable, match="no worker"):
        env.route(PROMPT, hints=RouteHints(pinned_worker_id=77))
    with pytest.raises(Unavailable, match="no worker"):
        env.route(PROMPT, hints=RouteHints(dp_rank=1))
    assert env.sample("tokenyard_router_rejections_total", {"reason": "unavailable"}) == 4


def test_pools_follow_worker_roles() -> None:
    env = Env(n=1)
    env.workers.apply(WatchEventKind.ADDED, worker(10, role="prefill"))
    env.workers.apply(WatchEventKind.ADDED, worker(11, role="decode"))
    assert env.route(PROMPT, pool="prefill")[1].worker_id == 10
    assert env.route(PROMPT, pool="decode")[1].worker_id == 11
    assert env.route(PROMPT, pool="aggregated")[1].worker_id == 1
    served = {env.route([i])[1].worker_id for i in range(30)}
    assert served == {1, 11}


def test_all_busy_is_overloaded_and_busy_workers_are_skipped() -> None:
    env = Env(n=2, config=RouterConfig(busy=BusyThresholds(active_prefill_tokens=300)))
    env.route(list(range(20)), hints=RouteHints(pinned_worker_id=1))  # 320 prefill tokens on worker 1
    for _ in range(3):
        assert env.route(PROMPT)[1].worker_id == 2
    with pytest.raises(Overloaded, match="busy"):
        env.route(PROMPT)
    assert env.sample("tokenyard_router_rejections_total", {"reason": "overloaded"}) == 1


def test_busy_needs_every_rank_busy_and_uses_reported_load() -> None:
    env = Env(n=1, config=RouterConfig(busy=BusyThresholds(active_decode_blocks=0.5)))
    state = env.workers.get(1)
    assert state is not None
    state.details = WorkerDetails(dp_size=2, total_kv_blocks=100)
    state.loads[0] = LoadReport(0, 90, 100, 0, 3, 0, received_at=env.clock.now)
    assert env.route(PROMPT)[1].dp_rank in (0, 1)
    state.loads[1] = LoadReport(1, 60, 100, 0, 3, 0, received_at=env.clock.now)
    with pytest.raises(Overloaded):
        env.route(PROMPT)
    env.clock.now += 60  # stale reports no longer count
    env.route(PROMPT)


def test_dp_ranks_are_separate_targets() -> None:
    env = Env(n=1)
    state = env.workers.get(1)
    assert state is not None
    state.details = WorkerDetails(dp_size=2)
    env.cache(1, PROMPT, rank=1)
    assert env.route(PROMPT)[1].dp_rank == 1
    assert env.route(PROMPT, hints=RouteHints(dp_rank=0))[1].dp_rank == 0


def test_ranks_follow_a_worker_that_describes_more_of_them_after_routing_began() -> None:
    env = Env(n=1)
    state = env.workers.get(1)
    assert state is not None
    assert env.route(PROMPT)[1].dp_rank == 0  # undescribed: rank 0 only
    state.details = WorkerDetails(dp_size=3)
    env.cache(1, PROMPT, rank=2)
    assert env.route(PROMPT)[1].dp_rank == 2
    state.details = WorkerDetails(dp_size=1)  # restarted with fewer ranks
    assert env.route(PROMPT)[1].dp_rank == 0


def test_modes() -> None:
    env = Env(n=3)
    rr = [env.route([i], hints=RouteHints(mode="round-robin"))[1].worker_id for i in range(6)]
    assert rr[:3] == rr[3:] and sorted(rr[:3]) == [1, 2, 3]
    assert env.route([1], hints=RouteHints(mode="least-loaded"))[1].worker_id in {1, 2, 3}
    # two requests each now; least-loaded picks among the equal minimum, then the new minimum
    env.route([2], hints=RouteHints(mode="direct", pinned_worker_id=2))
    picks = {env.route([i], hints=RouteHints(mode="least-loaded"))[1].worker_id for i in range(2)}
    assert 2 not in picks
    with pytest.raises(InvalidArgument, match="pinned_worker_id"):
        env.route([1], hints=RouteHints(mode="direct"))
    with pytest.raises(InvalidArgument, match="unknown routing mode"):
        env.route([1], hints=RouteHints(mode="fastest"))
    p2 = {env.route([i], hints=RouteHints(mode="power-of-two"))[1].worker_id for i in range(30)}
    assert p2 <= {1, 2, 3}
    assert env.sample("tokenyard_router_decisions_total", {"mode": "round-robin"}) == 6


def test_power_of_two_prefers_the_less_loaded_of_its_pair() -> None:
    env = Env(n=2)
    for i in range(5):
        env.route([i], hints=RouteHints(mode="direct", pinned_worker_id=1))
    picks = {env.route([i], hints=RouteHints(mode="power-of-two"))[1].worker_id for i in range(3)}
    assert picks == {2}


def test_hint_overrides_and_validation() -> None:
    env = Env(n=2)
    env.cache(1, PROMPT)
    env.route([50, 51], hints=RouteHints(pinned_worker_id=1))  # some load on worker 1
    assert env.route(PROMPT)[1].worker_id == 1
    assert env.route(PROMPT, hints=RouteHints(overlap_score_credit=0.0))[1].worker_id == 2
    with pytest.raises(InvalidArgument, match="temperature"):
        env.route(PROMPT, hints=RouteHints(temperature=-1.0))
    with pytest.raises(InvalidArgument, match="sequence_hashes"):
        env.route(PROMPT, sequence_hashes=[1, 2])
    with pytest.raises(InvalidArgument, match="request_id"):
        env.scheduler.route(RouteQuery("", MODEL, PROMPT, 10))


def test_lower_tiers_count_as_credit() -> None:
    env = Env(n=2)
    env.cache(2, PROMPT, tier=Tier.HOST_PINNED)
    assert env.route(PROMPT)[1].worker_id == 2


def test_worker_leaving_is_forgotten() -> None:
    env = Env(n=2)
    env.cache(1, PROMPT)
    env.route(PROMPT)
    env.workers.apply(WatchEventKind.REMOVED, worker(1))
    env.scheduler.forget_worker(1)
    assert env.index.device.num_blocks() == 0 and len(env.active) == 0
    assert env.route(PROMPT)[1].worker_id == 2


def test_approximate_mode_remembers_its_decisions_for_a_while() -> None:
    env = Env(n=4, approx=True)
    rid, d = env.route(PROMPT)
    first = d.worker_id
    env.scheduler.finish(rid)
    for i in range(3):
        rid, d = env.route([*PROMPT, i])
        assert d.worker_id == first and d.overlap_blocks == 8
        env.scheduler.finish(rid)
    env.clock.now += 11
    assert env.approx is not None and env.approx.expire() > 0
    assert env.index.device.num_blocks() == 0


def test_approximate_mode_is_bounded() -> None:
    index = make_index("positional")
    clock = Clock()
    rec = ApproximateRecorder(index, ttl=100, max_blocks=20, prune_ratio=0.5, clock=clock)
    for i in range(10):
        rec.record(WorkerRank(1, 0), Prompt([i * 10 + j for j in range(4)]))
        clock.now += 1
    assert len(rec) <= 20 and index.num_blocks() <= 20
    # The most recent prompt survived the pruning, the oldest did not.
    assert index.find_matches(Prompt([90, 91, 92, 93])) == {WorkerRank(1, 0): 4}
    assert index.find_matches(Prompt([0, 1, 2, 3])) == {}


def test_predict_on_route_sends_siblings_after_the_first_before_the_worker_reports() -> None:
    env = Env(n=4, predicted=True)
    rid, first = env.route(PROMPT)
    env.scheduler.first_token(rid)
    for i in range(3):
        _, d = env.route([*PROMPT, i])
        assert d.worker_id == first.worker_id and d.overlap_blocks == 8
    assert env.index.device.num_blocks() == 0, "the real index only holds what workers report"
    env.clock.now += 3
    assert env.predicted is not None and env.predicted.expire() > 0
    assert env.route([*PROMPT, 9])[1].overlap_blocks == 0
