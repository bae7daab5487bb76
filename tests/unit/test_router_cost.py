"""Cost function and selection: the reference's worked example, softmax, random tie-breaks."""

from __future__ import annotations

import collections
import math
import random

import pytest

from tokenyard.router.policies.cost import (
    CostKnobs,
    RankState,
    costs,
    select,
    select_min,
    softmax_probabilities,
)

pytestmark = pytest.mark.unit

BS = 16


def state(**kw: float) -> RankState:
    return RankState(**kw)  # type: ignore[arg-type]


def test_worked_example_chooses_b() -> None:
    # Raw prefill 10 blocks everywhere (an idle worker, a 10-block prompt), credit 1.
    # A: overlap 2, decode 10 -> 18; B: overlap 5, decode 5 -> 10; C: overlap 8, decode 9 -> 11.
    isl = 10 * BS
    a = state(device_overlap=2, active_blocks=10, active_overlap=10)
    b = state(device_overlap=5, active_blocks=5, active_overlap=10)
    c = state(device_overlap=8, active_blocks=9, active_overlap=10)
    values = costs([a, b, c], isl, BS, CostKnobs())
    assert values == [18.0, 10.0, 11.0]
    assert select(values, 0.0, random.Random(0)) == 1


def test_prefill_load_and_new_blocks_count() -> None:
    # 4-block prompt; active prefill 32 tokens = 2 blocks; 3 active blocks of which the prompt's
    # first 1 is one; 2 requests at weight 0.5.
    s = state(
        active_prefill_tokens=32, active_blocks=3, active_overlap=1, active_requests=2, device_overlap=1
    )
    knobs = CostKnobs(active_request_weight=0.5, prefill_load_scale=2.0)
    # prefill 2 * ((32 + 64)/16 - 1) = 10; decode 3 + (4 - 1) = 6; requests 1
    assert costs([s], 4 * BS, BS, knobs) == [17.0]


def test_partial_block_prompt_rounds_up() -> None:
    assert costs([state()], BS + 1, BS, CostKnobs()) == [(BS + 1) / BS + 2]


def test_zero_credit_ignores_the_cache() -> None:
    cached, cold = state(device_overlap=8), state()
    values = costs([cached, cold], 8 * BS, BS, CostKnobs().with_overrides(overlap_score_credit=0.0))
    assert values[0] == values[1]


def test_credit_decays_on_workers_with_more_prefill_queued() -> None:
    knobs = CostKnobs(credit_decay=1.0)
    # Same overlap; the second worker has 4 blocks more prefill queued on a 4-block request:
    # decay 1/(1 + 1*4/4) = 0.5, so it gets half the credit.
    fresh = state(device_overlap=4, active_prefill_tokens=0)
    queued = state(device_overlap=4, active_prefill_tokens=4 * BS)
    values = costs([fresh, queued], 4 * BS, BS, knobs)
    assert values[0] == pytest.approx(4 - 4 + 4)
    assert values[1] == pytest.approx(8 - 2 + 4)


def test_lower_tiers_credit_only_blocks_beyond_faster_ones() -> None:
    knobs = CostKnobs()
    s = state(device_overlap=2, host_overlap=6, disk_overlap=10, external_overlap=12)
    prefill_blocks = 16
    expected_credit = 2 + 0.75 * 4 + 0.25 * 4  # shared multiplier 0 by default
    assert costs([s], prefill_blocks * BS, BS, knobs) == [
        pytest.approx(prefill_blocks - expected_credit + 16)
    ]
    shared = CostKnobs(shared_cache_multiplier=0.5)
    assert costs([s], prefill_blocks * BS, BS, shared) == [
        pytest.approx(prefill_blocks - expected_credit - 5 + 16)
    ]


def test_tracking_switches() -> None:
    s = state(active_prefill_tokens=100, active_blocks=7)
    assert costs([s], BS, BS, CostKnobs(track_prefill_tokens=False)) == [7 + 1]
    assert costs([s], BS, BS, CostKnobs(track_active_blocks=False)) == [(100 + BS) / BS]


def test_minimum_ties_spread_across_candidates() -> None:
    rng = random.Random(7)
    counts = collections.Counter(select([3.0, 1.0, 1.0, 5.0, 1.0], 0.0, rng) for _ in range(3000))
    assert set(counts) == {1, 2, 4}
    for i in (1, 2, 4):
        assert 800 < counts[i] < 1200, counts


def test_select_min_never_prefers_order() -> None:
    rng = random.Random(1)
    firsts = sum(select_min([0.0] * 8, rng) == 0 for _ in range(800))
    assert firsts < 200


def test_softmax_over_normalised_costs() -> None:
    values = [10.0, 20.0, 30.0]
    t = 0.5
    probs = softmax_probabilities(values, t)
    weights = [math.exp(-0.0 / t), math.exp(-0.5 / t), math.exp(-1.0 / t)]
    assert probs == pytest.approx([w / sum(weights) for w in weights])
    # Normalisation makes the distribution independent of the cost scale.
    assert softmax_probabilities([1.0, 2.0, 3.0], t) == pytest.approx(probs)
    rng = random.Random(3)
    counts = collections.Counter(select(values, t, rng) for _ in range(20000))
    for i, p in enumerate(probs):
        assert counts[i] / 20000 == pytest.approx(p, abs=0.02)


def test_equal_costs_at_any_temperature_are_uniform() -> None:
    assert softmax_probabilities([4.0, 4.0], 2.0) == [0.5, 0.5]
    rng = random.Random(5)
    counts = collections.Counter(select([4.0, 4.0, 4.0], 1.0, rng) for _ in range(3000))
    assert all(900 < counts[i] < 1100 for i in range(3)), counts


def test_low_temperature_approaches_the_minimum() -> None:
    rng = random.Random(9)
    picks = [select([5.0, 1.0, 9.0], 0.01, rng) for _ in range(500)]
    assert picks.count(1) == 500


def test_overrides_leave_unset_knobs() -> None:
    base = CostKnobs(overlap_score_credit=2.0, prefill_load_scale=3.0, temperature=0.1)
    assert base.with_overrides() is base
    o = base.with_overrides(temperature=0.0)
    assert (o.overlap_score_credit, o.prefill_load_scale, o.temperature) == (2.0, 3.0, 0.0)
