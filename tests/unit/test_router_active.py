"""Active-request tracking: add, first token, finish — each exactly once; expiry; worker removal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenyard.router.active import ActiveRequest, ActiveRequests, Outcome

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lifecycle_applies_once() -> None:
    active = ActiveRequests()
    assert active.add(ActiveRequest("r1", worker_id=7, dp_rank=0, prompt_tokens=100, cached_tokens=40))
    assert not active.add(ActiveRequest("r1", worker_id=8, dp_rank=0, prompt_tokens=1, cached_tokens=0))
    assert active.load(7).active_prefill_tokens == 60
    assert active.first_token("r1")
    assert not active.first_token("r1")
    assert active.load(7).active_prefill_tokens == 0
    assert active.load(7).active_requests == 1
    assert active.finish("r1", Outcome.FINISHED)
    assert not active.finish("r1", Outcome.CANCELLED)
    assert active.load(7).active_requests == 0
    assert not active.first_token("r1")


def test_finish_before_first_token_releases_prefill() -> None:
    active = ActiveRequests()
    active.add(ActiveRequest("r", 1, 0, prompt_tokens=50, cached_tokens=0))
    active.finish("r", Outcome.FAILED)
    assert active.load(1).active_prefill_tokens == 0


def test_expiry_forgets_old_requests_only() -> None:
    clock = Clock()
    active = ActiveRequests(expiry_seconds=10, clock=clock)
    active.add(ActiveRequest("old", 1, 0, 10, 0))
    clock.now += 6
    active.add(ActiveRequest("new", 1, 0, 10, 0))
    clock.now += 5
    assert active.expire() == 1
    assert active.get("old") is None and active.get("new") is not None
    assert active.load(1).active_requests == 1


def test_drop_worker() -> None:
    active = ActiveRequests()
    for i in range(3):
        active.add(ActiveRequest(f"a{i}", 1, 0, 10, 0))
    active.add(ActiveRequest("b", 2, 0, 10, 0))
    assert active.drop_worker(1) == 3
    assert len(active) == 1 and active.load(1).active_requests == 0


ops = st.lists(
    st.tuples(st.sampled_from(["add", "first", "finish", "expire"]), st.integers(0, 9), st.integers(0, 3)),
    max_size=200,
)


@given(ops)
def test_load_is_consistent_under_any_order(seq: list[tuple[str, int, int]]) -> None:
    clock = Clock()
    active = ActiveRequests(expiry_seconds=5, clock=clock)
    for op, rid, worker in seq:
        clock.now += 1
        if op == "add":
            active.add(ActiveRequest(f"r{rid}", worker, 0, prompt_tokens=10 * (rid + 1), cached_tokens=rid))
        elif op == "first":
            active.first_token(f"r{rid}")
        elif op == "finish":
            active.finish(f"r{rid}", Outcome.FINISHED)
        else:
            active.expire()
        for w in range(4):
            reqs = [r for r in (active.get(f"r{i}") for i in range(10)) if r is not None and r.worker_id == w]
            assert active.load(w).active_requests == len(reqs)
            assert active.load(w).active_prefill_tokens == sum(r.prefill_tokens for r in reqs)
