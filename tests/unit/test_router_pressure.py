"""The kv mode at the cache-pressure limit: the forecast of what each rank keeps, placements that
keep prefixes where they survive and evict least, deliberate replication, expected output load,
and session affinity."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tokenyard.common.discovery import Instance, ModelCard, WatchEventKind
from tokenyard.common.errors import InvalidArgument
from tokenyard.common.hashing import sequence_hashes
from tokenyard.router.active import ActiveRequests
from tokenyard.router.busy import BusyThresholds
from tokenyard.router.index import WorkerRank, make_index
from tokenyard.router.index.recency import KeepForecast
from tokenyard.router.index.tiers import Tier, TieredIndex
from tokenyard.router.metrics import RouterMetrics
from tokenyard.router.policies.cost import CostKnobs, RankState, costs
from tokenyard.router.scheduler import RouteDecision, RouteHints, RouteQuery, RouterConfig, Scheduler
from tokenyard.router.workers import WorkerSet

pytestmark = pytest.mark.unit

BS = 16
MODEL = "m"
A = WorkerRank(1, 0)


# -- the forecast ---------------------------------------------------------------------------------


def test_forecast_is_an_lru_bounded_by_capacity_that_counts_reuse() -> None:
    f = KeepForecast(lambda rank: 6 if rank == A else 0)
    f.touch(A, [1, 2, 3])
    f.touch(A, [4])
    f.touch(A, [1, 2])  # reused: hot, and now the most recent (order 3, 4, 1, 2)
    assert f.free_blocks(A) == 2
    assert f.evicted_hot(A, 2) == 0  # fits
    assert f.evicted_hot(A, 4) == 0  # 3 and 4 go, both used once
    assert f.evicted_hot(A, 6) == 2  # then 1 and 2
    f.touch(A, [5, 6, 7, 8])  # over capacity: the oldest (3, 4) leave
    assert f.blocks(A) == 6
    assert f.evicted_hot(A, 2) == 2  # now 1 and 2 are the oldest
    # An unknown capacity is never forecast.
    other = WorkerRank(2, 0)
    f.touch(other, [1, 2])
    assert f.free_blocks(other) is None and f.evicted_hot(other, 100) == 0


def test_blocks_a_full_forecast_evicted_are_doomed_and_release_refreshes_them() -> None:
    f = KeepForecast(lambda rank: 4)
    f.touch(A, [1, 2])
    assert f.doomed(A, [1, 2, 9]) == 0  # nothing evicted; 9 is just unknown (another router's)
    f.touch(A, [3, 4])
    f.release(A, [1, 2])  # the request that used 1 and 2 ended after 3 and 4 were stored
    assert f.evicted_hot(A, 6) == 0  # nothing was used twice
    f.touch(A, [5, 6])  # evicts 3 and 4, the least recently released
    assert f.doomed(A, [1, 2]) == 0
    assert f.doomed(A, [3, 4]) == 2


def test_a_chain_is_evicted_leaves_first_like_an_engine_does() -> None:
    f = KeepForecast(lambda rank: 4)
    f.touch(A, [1, 2, 3, 4])
    f.touch(A, [9])
    assert f.doomed(A, [1, 2, 3, 4]) == 1  # its leaf went, the prefix 1..3 survives
    f.touch(A, [8, 7])
    assert f.doomed(A, [1, 2, 3, 4]) == 3


def test_doomed_counts_within_the_overlap_and_the_evicted_record_stays_bounded() -> None:
    f = KeepForecast(lambda rank: 4)
    f.touch(A, [1, 2, 3, 4])
    f.touch(A, [9, 8])  # evicts the leaves 4 and 3
    r = f.ranks[A]
    assert r.doomed([1, 2, 3, 4]) == 2
    assert r.doomed([1, 2, 3, 4], 3) == 1  # of the first three blocks, only 3 is gone
    assert r.doomed([1, 2, 3, 4], 2) == 0
    assert r.doomed([1, 2, 3, 4], 10) == 2  # a length past the chain is the whole chain
    for start in range(100, 200, 2):
        f.touch(A, [start, start + 1])
    assert len(r.gone) <= r.capacity  # what it evicted, about as much as the rank holds


# -- decisions ------------------------------------------------------------------------------------


class Env:
    def __init__(self, n: int = 3, total_blocks: int = 20, config: RouterConfig | None = None) -> None:
        self.workers = WorkerSet()
        card = ModelCard(MODEL, "tok", BS, 4096, total_blocks, "mocker", "aggregated")
        for wid in range(1, n + 1):
            self.workers.apply(
                WatchEventKind.ADDED,
                Instance(wid, "worker", "aggregated", f"127.0.0.1:{9000 + wid}", model_card=card),
            )
        self.index = TieredIndex(lambda: make_index("positional", jump=4))
        self.active = ActiveRequests()
        self.metrics = RouterMetrics()
        self.scheduler = Scheduler(
            self.workers, self.index, self.active, config, metrics=self.metrics, rng=random.Random(0)
        )
        self._ids = 0

    def cache(self, wid: int, locals_: list[int]) -> None:
        """The worker reports these blocks stored (a KV event)."""
        self.index.device.store(WorkerRank(wid, 0), None, sequence_hashes(locals_), locals_)

    def use(self, wid: int, locals_: list[int], times: int = 1) -> None:
        """Requests for this prompt were served on ``wid`` (routed there and ended)."""
        self.cache(wid, locals_)
        for _ in range(times):
            rid, _ = self.route(locals_, mode="direct", pinned_worker_id=wid)
            self.scheduler.finish(rid)

    def route(self, locals_: list[int], **hints: Any) -> tuple[str, RouteDecision]:
        self._ids += 1
        rid = f"r{self._ids}"
        q = RouteQuery(rid, MODEL, locals_, len(locals_) * BS, hints=RouteHints(**hints))
        return rid, self.scheduler.route(q)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def prompt(base: int, n: int = 8) -> list[int]:
    return list(range(base, base + n))


def test_a_new_prefix_goes_where_it_evicts_no_hot_blocks() -> None:
    env = Env(n=2)
    # Both caches are full (20 blocks): worker 1 with a prefix every request reuses, worker 2 with
    # prompts used once each.
    env.use(1, prompt(100, 20), times=3)
    env.use(2, prompt(200, 10))
    env.use(2, prompt(300, 10))
    for i in range(5):
        rid, d = env.route(prompt(900 + 100 * i))
        assert d.worker_id == 2 and d.mode == "kv"
        env.scheduler.finish(rid)
    assert env.sample("tokenyard_router_evicted_hot_blocks_sum") == 0


def test_the_previous_policy_evicts_a_hot_prefix_half_the_time() -> None:
    env = Env(n=2)
    env.use(1, prompt(100, 20), times=3)
    env.use(2, prompt(200, 20))
    chosen = {env.route(prompt(900 + 10 * i), mode="kv-classic")[1].worker_id for i in range(12)}
    assert chosen == {1, 2}  # a tie on load: it cannot tell the hot cache from the cold one


def test_a_prefix_goes_where_its_copy_survives() -> None:
    env = Env(n=2, total_blocks=20)
    p = prompt(100)
    for wid in (1, 2):
        env.use(wid, p)
        env.use(wid, prompt(500, 12))
    # Worker 2 served the prefix again (still cached: its events are what the index holds), then
    # both took 8 blocks of new work: on worker 1 that evicted the prefix, on worker 2 older blocks.
    env.use(2, p)
    env.route(prompt(600, 8), mode="direct", pinned_worker_id=1)
    env.route(prompt(700, 8), mode="direct", pinned_worker_id=2)
    _, d = env.route(p)
    assert d.worker_id == 2


def test_a_hot_prefix_is_replicated_when_its_worker_is_overloaded_and_only_then() -> None:
    env = Env(n=3, total_blocks=200)
    hot = prompt(100, 16)
    env.use(1, hot, times=2)
    # Worker 3's cache holds another hot prefix; worker 2's holds cold prompts.
    env.use(3, prompt(1000, 190), times=2)
    env.use(2, prompt(2000, 190))
    placed = []
    for i in range(30):
        # The hot prefix and a block of the request's own; never finished: load piles up.
        _, d = env.route([*hot, 5000 + i])
        placed.append(d.worker_id)
        if d.overlap_blocks == 0:
            env.cache(d.worker_id, hot)  # the copy's prefill stored it there
    # The first requests stay home; once worker 1's load outweighs a full prefill elsewhere, the
    # prefix is copied to the worker where the copy evicts no hot blocks, and both share the load.
    first_copy = placed.index(2)
    assert first_copy >= 8 and set(placed[:first_copy]) == {1}
    assert set(placed[first_copy : first_copy + 6]) == {1, 2}
    # A third copy, which evicts another hot prefix, comes only once both are loaded further.
    assert 3 not in placed[: first_copy + 6]


def test_expected_output_counts_as_future_load() -> None:
    env = Env(n=2, total_blocks=1000)
    rid, d = env.route(prompt(100, 4), expected_output_tokens=64 * BS)
    assert env.active.load(d.worker_id).expected_output_tokens == 64 * BS
    other = 3 - d.worker_id
    # Same prompt length, no overlap anywhere: the rank expecting 64 more blocks is avoided.
    _, d2 = env.route(prompt(500, 4))
    assert d2.worker_id == other
    env.scheduler.finish(rid)
    assert env.active.load(d.worker_id).expected_output_tokens == 0


def test_a_cleared_cache_is_forgotten() -> None:
    env = Env(n=1)
    env.use(1, prompt(100, 10))
    assert env.scheduler.forecast.blocks(A) == 10
    env.index.clear_tier(Tier.DEVICE, A)  # a cleared event, or a snapshot replacing the rank
    assert env.scheduler.forecast.blocks(A) == 0


# -- sessions -------------------------------------------------------------------------------------


def test_follow_up_turns_go_where_the_history_is_unless_that_worker_is_busy() -> None:
    env = Env(n=2, total_blocks=1000, config=RouterConfig(busy=BusyThresholds(active_prefill_tokens=40 * BS)))
    _, first = env.route(prompt(100, 4), session_id="s1", mode="round-robin")
    home = first.worker_id
    # Later turns follow the session whatever the mode would choose.
    for _ in range(3):
        rid, d = env.route(prompt(100, 6), session_id="s1", mode="round-robin")
        assert d.worker_id == home
        env.scheduler.finish(rid)
    assert env.sample("tokenyard_router_session_routes_total", {"outcome": "followed"}) == 3
    # Its worker becomes busy: the turn goes elsewhere, and the session moves with it.
    env.route(prompt(900, 41), mode="direct", pinned_worker_id=home)
    _, moved = env.route(prompt(100, 8), session_id="s1")
    assert moved.worker_id != home
    _, after = env.route(prompt(100, 9), session_id="s1")
    assert after.worker_id == moved.worker_id
    # A worker that leaves takes its sessions along.
    env.workers.apply(WatchEventKind.REMOVED, env.workers.get(moved.worker_id).instance)  # type: ignore[union-attr]
    env.scheduler.forget_worker(moved.worker_id)
    assert env.scheduler.sessions.get("s1") is None


def test_a_turn_leaves_its_sessions_worker_when_that_cache_cannot_hold_it() -> None:
    env = Env(n=2, total_blocks=40)
    rid, first = env.route(prompt(100, 10), session_id="s1")
    home = first.worker_id
    env.scheduler.finish(rid)
    rid, second = env.route(prompt(100, 12), session_id="s1")
    assert second.worker_id == home
    env.scheduler.finish(rid)
    # Another request holds 24 of the home's 40 blocks while the next turn comes: that turn
    # needs 24 + 14 of its own + 2 x 2 (the partial and output blocks of both) = 42.
    env.route(prompt(900, 24), mode="direct", pinned_worker_id=home)
    # The previous policy does not forecast capacity: the session follows whatever it costs.
    rid, classic = env.route(prompt(100, 14), session_id="s1", mode="kv-classic")
    assert classic.worker_id == home
    env.scheduler.finish(rid)
    _, moved = env.route(prompt(100, 14), session_id="s1")
    assert moved.worker_id != home
    assert env.sample("tokenyard_router_session_routes_total", {"outcome": "moved"}) == 1
    _, after = env.route(prompt(100, 16), session_id="s1")
    assert after.worker_id == moved.worker_id  # the session moved with it
    assert env.sample("tokenyard_router_session_routes_total", {"outcome": "followed"}) == 3


def test_session_ids_are_bounded() -> None:
    env = Env(n=1)
    with pytest.raises(InvalidArgument, match="session_id is longer than 256"):
        env.route(prompt(100), session_id="x" * 257)


def test_a_rank_whose_cache_cannot_hold_its_running_requests_and_this_one_is_avoided() -> None:
    knobs = CostKnobs()
    # 16 blocks of prompt, all cached on the first rank, whose running requests fill its cache.
    full = RankState(active_blocks=18, active_requests=2, device_overlap=16, capacity_blocks=24)
    idle = RankState(capacity_blocks=24)
    hit, miss = costs([full, idle], 16 * BS, BS, knobs, pressure=True)
    # Needed on the first: 18 active + 2 x 3 (partial and output blocks of the 2 running and
    # this one) + 16 new = 40 of 24: 16 over.
    assert hit - costs([full], 16 * BS, BS, knobs)[0] == pytest.approx(
        knobs.overflow_weight * 16 - (1 - knobs.decode_load_scale) * (18 + 16)
    )
    assert miss < hit
