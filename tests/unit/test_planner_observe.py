"""Observations from the frontends' Prometheus text: counters differenced, restarts handled,
nonsense refused."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tokenyard.planner.observe import (
    Counters,
    FrontendCounters,
    ObservationError,
    difference,
    observation,
    parse_counters,
)

pytestmark = pytest.mark.unit


def page(requests: int, isl: list[int], ttft_s: list[float], model: str = "m") -> str:
    """A /metrics page as the frontend's own metric classes render it."""
    from tokenyard.frontend.metrics import FrontendMetrics

    registry = CollectorRegistry()
    metrics = FrontendMetrics(registry)
    series = metrics.model(model)
    for _ in range(requests):
        metrics.count(model, "completions", True, "success")
    metrics.count(model, "completions", True, "error", "internal")
    for n in isl:
        series.isl.observe(n)
        series.osl.observe(10)
        series.hit_rate.observe(0.25)
    for t in ttft_s:
        series.ttft.observe(t)
        series.itl.observe(0.02)
    return generate_latest(registry).decode()


def test_parse_and_difference() -> None:
    before = parse_counters(page(2, [100, 300], [0.1, 0.3]))
    after = parse_counters(page(5, [100, 300, 200, 200, 200], [0.1, 0.3, 0.2, 0.2, 0.2]))
    assert before.requests == 2  # errors are not counted
    obs = observation([difference(before, after)], interval_s=3.0)
    assert obs.requests == 3 and obs.request_rate == 1.0
    assert obs.isl == 200 and obs.osl == 10
    assert obs.ttft_ms == pytest.approx(200) and obs.itl_ms == pytest.approx(20)
    assert obs.kv_hit_rate == pytest.approx(0.25)


def test_only_the_served_model_counts() -> None:
    text = page(4, [100] * 4, [0.1] * 4, model="a") + "\n"
    assert parse_counters(text, "a").requests == 4
    assert parse_counters(text, "b").requests == 0


def test_a_restarted_frontend_counts_from_zero() -> None:
    before = Counters(10, (("isl", 1000.0, 10.0),))
    after = Counters(2, (("isl", 300.0, 2.0),))
    assert difference(before, after) == after


def test_the_first_scrape_is_not_an_interval() -> None:
    counters = FrontendCounters()
    first = counters.update({"a": parse_counters(page(5, [10] * 5, [0.1] * 5))}, 10.0)
    assert math.isnan(first.requests)
    second = counters.update({"a": parse_counters(page(7, [10] * 7, [0.1] * 7))}, 10.0)
    assert second.requests == 2


def test_no_traffic_means_unknown_lengths() -> None:
    obs = observation([Counters(0.0, (("isl", 0.0, 0.0),))], 10.0)
    assert obs.requests == 0 and math.isnan(obs.isl) and math.isnan(obs.ttft_ms)


def test_nonsense_is_refused() -> None:
    with pytest.raises(ObservationError, match="not Prometheus text"):
        parse_counters("tokenyard_frontend_requests_total{ 1\n")
    with pytest.raises(ObservationError, match="hit rate"):
        observation([Counters(1, (("hit", 5.0, 1.0),))], 1.0)
