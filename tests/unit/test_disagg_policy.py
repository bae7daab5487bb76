"""Conditional disaggregation's policies (:mod:`tokenyard.frontend.disagg`): where a split model's
request is prefilled, from what the router said about the decode and prefill workers it chose."""

from __future__ import annotations

import pytest

from tokenyard.frontend.disagg import (
    LOCAL_REASONS,
    REMOTE_REASONS,
    DisaggConfig,
    DisaggPolicy,
    after_prefill_route,
    decide,
    decode_guarded,
    mostly_cached,
    prefill_busy,
)
from tokenyard.frontend.generation import RouteDecision

pytestmark = pytest.mark.unit

BLOCK = 16


def _decode(cached: int = 0, active_blocks: int = 0, total_blocks: int = 0) -> RouteDecision:
    return RouteDecision(
        1,
        0,
        "d:1",
        cached,
        overlap_blocks=cached // BLOCK,
        active_decode_blocks=active_blocks,
        total_kv_blocks=total_blocks,
    )


def _prefill(active_tokens: int, budget: int = 8192) -> RouteDecision:
    return RouteDecision(2, 0, "p:1", 0, active_prefill_tokens=active_tokens, max_num_batched_tokens=budget)


@pytest.mark.parametrize(
    ("isl", "cached", "bypass"),
    [
        # eff_isl = isl - cached must be under 2048 tokens *and* under 0.7 of the prompt.
        (3000, 1000, True),  # eff 2000, 0.67
        (3000, 800, False),  # eff 2200: over the threshold
        (10_000, 7953, True),  # eff 2047
        (10_000, 7952, False),  # eff 2048: not under the threshold
        (1000, 300, False),  # eff 700 = 0.7 of the prompt: not under the ratio
        (1000, 301, True),  # eff 699
        (100, 0, False),  # a short prompt with nothing cached goes remote, as in the reference
        (100, 100, True),
        (0, 0, True),
    ],
)
def test_isl_bounding_bypasses_prompts_mostly_cached_on_the_decode_worker(
    isl: int, cached: int, bypass: bool
) -> None:
    assert mostly_cached(DisaggConfig(), isl, cached) is bypass


def test_isl_bounding_thresholds_are_settings() -> None:
    assert not mostly_cached(DisaggConfig(isl_threshold=1000), 3000, 2000)
    assert mostly_cached(DisaggConfig(isl_ratio=0.9), 1000, 200)


def test_prefill_busy_compares_queued_tokens_with_the_step_budget() -> None:
    cfg = DisaggConfig(prefill_busy_frac=1.5)
    assert not prefill_busy(cfg, _prefill(12_288))
    assert prefill_busy(cfg, _prefill(12_289))
    # A worker that never said its budget is never busy.
    assert not prefill_busy(cfg, _prefill(1_000_000, budget=0))


def test_decode_guard_counts_the_request_s_new_blocks() -> None:
    cfg = DisaggConfig(decode_busy_frac=0.5)
    # 900 blocks in use + 3200 / 16 = 200 new, 100 of them cached: 1000 of 2000 is not above half.
    assert not decode_guarded(cfg, _decode(cached=1600, active_blocks=900, total_blocks=2000), 3200, BLOCK)
    assert decode_guarded(cfg, _decode(cached=1600, active_blocks=901, total_blocks=2000), 3200, BLOCK)
    # Off by default, and without a known pool size.
    assert not decode_guarded(DisaggConfig(), _decode(active_blocks=10**6, total_blocks=1), 3200, BLOCK)
    assert not decode_guarded(cfg, _decode(active_blocks=10**6, total_blocks=0), 3200, BLOCK)


def _final(cfg: DisaggConfig, isl: int, decode: RouteDecision, prefill: RouteDecision) -> tuple[bool, str]:
    first = decide(cfg, isl, decode, BLOCK)
    if not first.remote:
        return False, first.reason
    final = after_prefill_route(cfg, first, prefill)
    return final.remote, final.reason


CACHED = _decode(cached=2900)
COLD = _decode(cached=0)
BUSY = _prefill(20_000)
FREE = _prefill(0)


@pytest.mark.parametrize(
    ("policy", "decode", "prefill", "expected"),
    [
        (DisaggPolicy.ALWAYS, CACHED, BUSY, (True, "always")),
        (DisaggPolicy.NEVER, COLD, FREE, (False, "never")),
        (DisaggPolicy.ISL_BOUNDING, CACHED, FREE, (False, "cached")),
        (DisaggPolicy.ISL_BOUNDING, COLD, BUSY, (True, "uncached")),
        (DisaggPolicy.PREFILL_LOAD, CACHED, FREE, (True, "prefill_free")),
        (DisaggPolicy.PREFILL_LOAD, COLD, BUSY, (False, "prefill_busy")),
        (DisaggPolicy.ISL_OR_LOAD, CACHED, FREE, (False, "cached")),
        (DisaggPolicy.ISL_OR_LOAD, COLD, BUSY, (False, "prefill_busy")),
        (DisaggPolicy.ISL_OR_LOAD, COLD, FREE, (True, "uncached")),
    ],
)
def test_each_policy_decides_as_the_reference_does(
    policy: DisaggPolicy, decode: RouteDecision, prefill: RouteDecision, expected: tuple[bool, str]
) -> None:
    assert _final(DisaggConfig(policy=policy), 3000, decode, prefill) == expected
    remote, reason = expected
    assert reason in (REMOTE_REASONS if remote else LOCAL_REASONS)


def test_the_decode_guard_keeps_a_busy_decode_worker_from_prefilling_locally() -> None:
    cfg = DisaggConfig(policy=DisaggPolicy.ISL_OR_LOAD, decode_busy_frac=0.8)
    crowded = _decode(cached=2900, active_blocks=950, total_blocks=1000)
    # Mostly cached, and the prefill worker is busy: still remote, the decode worker has no room.
    assert _final(cfg, 3000, crowded, BUSY) == (True, "decode_busy")
    roomy = _decode(cached=2900, active_blocks=10, total_blocks=1000)
    assert _final(cfg, 3000, roomy, BUSY) == (False, "cached")
