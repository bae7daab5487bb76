"""The router's pools for disaggregated serving: what a request routed in the prefill or the decode
pool counts as, how the decode pool's cost credits cached blocks, the load a decision reports,
replica sync of the pool, and the per-pool metrics."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from tokenyard.common.discovery import Instance, ModelCard, WatchEventKind
from tokenyard.common.hashing import sequence_hashes
from tokenyard.router.active import ActiveRequests, routed_request
from tokenyard.router.index import WorkerRank, make_index
from tokenyard.router.index.tiers import TieredIndex
from tokenyard.router.metrics import RouterMetrics
from tokenyard.router.policies.cost import CostKnobs, RankState, costs
from tokenyard.router.replication.peers import replica_event_from_pb
from tokenyard.router.replication.replicas import LifecycleEvent, ReplicaEvent, Routed, apply_peer_event
from tokenyard.router.scheduler import RouteQuery, Scheduler
from tokenyard.router.servicer import replica_event_to_pb
from tokenyard.router.workers import LoadReport, WorkerDetails, WorkerSet

pytestmark = pytest.mark.unit

BS = 16
MODEL = "m"
PROMPT = list(range(100, 110))  # 10 blocks


def _worker(wid: int, role: str) -> Instance:
    card = ModelCard(MODEL, "tok", BS, 4096, 1000, "mocker", role)
    return Instance(wid, "worker", role, f"127.0.0.1:{9000 + wid}", model_card=card)


class Env:
    """Prefill workers 1 and 2, decode workers 3 and 4."""

    def __init__(self) -> None:
        self.workers = WorkerSet()
        for wid, role in ((1, "prefill"), (2, "prefill"), (3, "decode"), (4, "decode")):
            self.workers.apply(WatchEventKind.ADDED, _worker(wid, role))
        self.index = TieredIndex(lambda: make_index("positional", jump=4))
        self.active = ActiveRequests()
        self.metrics = RouterMetrics()
        self.events: list[LifecycleEvent] = []
        self.scheduler = Scheduler(
            self.workers,
            self.index,
            self.active,
            metrics=self.metrics,
            rng=random.Random(0),
            publish=self.events.append,
        )

    def cache(self, wid: int, locals_: list[int]) -> None:
        self.index.device.store(WorkerRank(wid, 0), None, sequence_hashes(locals_), locals_)

    def route(self, rid: str, pool: str, locals_: list[int] = PROMPT) -> int:
        return self.scheduler.route(RouteQuery(rid, MODEL, locals_, len(locals_) * BS, pool=pool)).worker_id


def test_each_pool_routes_to_its_own_workers() -> None:
    env = Env()
    assert {env.route(f"p{i}", "prefill") for i in range(8)} <= {1, 2}
    assert {env.route(f"d{i}", "decode") for i in range(8)} <= {3, 4}
    # The pool clients are served by when nothing is split: decode workers (not prefill ones).
    assert {env.route(f"x{i}", "") for i in range(8)} <= {3, 4}


def test_a_prefill_pool_request_counts_prefill_load_only_and_a_decode_pool_one_decode_load_only() -> None:
    env = Env()
    prefill = env.route("r:prefill", "prefill")
    decode = env.route("r", "decode")
    p, d = env.active.load(prefill), env.active.load(decode)
    assert (p.active_requests, p.active_prefill_tokens, p.active_blocks) == (1, len(PROMPT) * BS, 0)
    assert (d.active_requests, d.active_prefill_tokens, d.active_blocks) == (1, 0, len(PROMPT))
    assert env.scheduler.finish("r:prefill") and env.scheduler.finish("r")
    assert env.active.load(prefill).active_requests == env.active.load(decode).active_requests == 0


def test_the_decode_pool_prefers_the_decode_worker_holding_the_prompt() -> None:
    env = Env()
    env.cache(4, PROMPT[:8])
    # Worker 4 holds 8 of 10 blocks; worker 3 holds nothing and is idle. Each request adds 2 blocks
    # of its own on worker 4 (cost 2, 4, 6 against 10 on worker 3).
    for i in range(3):
        assert env.route(f"d{i}", "decode", [*PROMPT[:8], 1000 + i, 2000 + i]) == 4
    decision = env.scheduler.route(
        RouteQuery("probe", MODEL, PROMPT, len(PROMPT) * BS, pool="decode", dry_run=True)
    )
    assert decision.cached_tokens == 8 * BS


def test_decode_credit_is_set_against_decode_blocks() -> None:
    knobs = CostKnobs().for_pool("decode")
    assert not knobs.track_prefill_tokens and knobs.decode_credit
    cached = RankState(active_blocks=20, device_overlap=8)
    cold = RankState(active_blocks=14)
    # 10 request blocks: max(0, 20 + 10 - 8) = 22 against 14 + 10 = 24.
    assert costs([cached, cold], 10 * BS, BS, knobs) == [22.0, 24.0]
    prefill = CostKnobs().for_pool("prefill")
    assert not prefill.track_active_blocks
    # Prefill pool: queued prompt tokens minus the cached ones, no decode term.
    loaded = RankState(active_prefill_tokens=64, active_blocks=500, device_overlap=2)
    assert costs([loaded], 10 * BS, BS, prefill) == [(64 / BS + 10 - 2) * prefill.prefill_load_scale]
    assert CostKnobs().for_pool("") == CostKnobs()


def test_a_decision_reports_the_chosen_rank_s_load_and_capacity() -> None:
    env = Env()
    state = env.workers.get(1)
    assert state is not None
    state.details = WorkerDetails(total_kv_blocks=777, max_num_batched_tokens=8192)
    state.loads[0] = LoadReport(0, active_blocks=5, total_blocks=800, waiting_requests=0, running_requests=1,
                                active_prefill_tokens=3000)  # fmt: skip
    env.workers.get(2).details = WorkerDetails(total_kv_blocks=777, max_num_batched_tokens=8192)  # type: ignore[union-attr]
    env.route("busy", "prefill")  # goes to worker 2, the one with nothing queued
    decision = env.scheduler.route(RouteQuery("next", MODEL, PROMPT, len(PROMPT) * BS, pool="prefill"))
    chosen = decision.worker_id
    expected = {1: (3000, 800), 2: (len(PROMPT) * BS, 777)}[chosen]
    assert (decision.active_prefill_tokens, decision.total_kv_blocks) == expected
    assert decision.max_num_batched_tokens == 8192


def test_replicas_apply_the_pool_s_accounting() -> None:
    env = Env()
    env.route("r:prefill", "prefill")
    env.route("r", "decode")
    routed = [e for e in env.events if isinstance(e, Routed)]
    assert [e.pool for e in routed] == ["prefill", "decode"]
    peer = ActiveRequests()
    for i, event in enumerate(routed):
        wire = replica_event_to_pb(ReplicaEvent("origin", i, 0, event))
        back = replica_event_from_pb(wire)
        assert back == replace(event, sequence_hashes=tuple(event.sequence_hashes))
        assert apply_peer_event(peer, "origin", back)
    for event in routed:
        mine, theirs = env.active.load(event.worker_id), peer.load(event.worker_id)
        assert (mine.active_prefill_tokens, mine.active_blocks) == (
            theirs.active_prefill_tokens,
            theirs.active_blocks,
        )


def test_routed_request_counts_what_its_pool_tracks() -> None:
    hashes = [1, 2, 3]
    assert routed_request("a", 1, 0, 48, 16, hashes, "prefill").block_hashes == ()
    assert routed_request("a", 1, 0, 48, 16, hashes, "prefill").prefill_tokens == 32
    assert routed_request("a", 1, 0, 48, 16, hashes, "decode").prefill_tokens == 0
    assert tuple(routed_request("a", 1, 0, 48, 16, hashes, "decode").block_hashes) == (1, 2, 3)
    both = routed_request("a", 1, 0, 48, 16, hashes)
    assert both.prefill_tokens == 32 and tuple(both.block_hashes) == (1, 2, 3)


def test_metrics_per_pool() -> None:
    env = Env()
    env.route("r:prefill", "prefill")
    env.route("r", "decode")
    env.route("s", "decode", [x + 1000 for x in PROMPT])
    env.metrics.refresh(env.workers, env.active, env.index)

    def sample(name: str, pool: str) -> float:
        return env.metrics.registry.get_sample_value(name, {"pool": pool}) or 0.0

    assert sample("tokenyard_router_pool_decisions_total", "prefill") == 1
    assert sample("tokenyard_router_pool_decisions_total", "decode") == 2
    assert sample("tokenyard_router_pool_workers", "prefill") == 2
    assert sample("tokenyard_router_pool_workers", "aggregated") == 0
    assert sample("tokenyard_router_pool_active_requests", "decode") == 2
    assert sample("tokenyard_router_pool_active_prefill_tokens", "prefill") == len(PROMPT) * BS
    assert sample("tokenyard_router_pool_active_prefill_tokens", "decode") == 0
    assert sample("tokenyard_router_pool_active_decode_blocks", "decode") == 2 * len(PROMPT)
    assert sample("tokenyard_router_pool_active_decode_blocks", "prefill") == 0
