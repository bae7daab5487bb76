"""Predictors on synthetic series (step, ramp, periodic) with error bounds, and the warm-up rules."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from tokenyard.planner.predictors import (
    PREDICTORS,
    ArimaPredictor,
    ConstantPredictor,
    KalmanPredictor,
    MovingAveragePredictor,
    new_predictor,
)

pytestmark = pytest.mark.unit


STEP = (10.0,) * 20 + (50.0,) * 20
RAMP = tuple(10.0 + 2 * i for i in range(40))
PERIODIC = tuple(50 + 20 * math.sin(2 * math.pi * i / 12) for i in range(48))


@functools.cache
def errors(name: str, series: tuple[float, ...]) -> np.ndarray:
    """One-step-ahead absolute errors over the series (computed once: ARIMA fits are slow)."""
    p = new_predictor(name)
    out = []
    for i, value in enumerate(series):
        if i:
            out.append(abs(p.predict() - value))
        p.add(value)
    return np.array(out)


# (predictor, series, bound on the mean error of the last 10 points)
CASES = [
    ("constant", STEP, 0.01),
    ("moving_average", STEP, 0.01),
    ("kalman", STEP, 3.0),
    ("arima", STEP, 0.5),
    ("constant", RAMP, 2.01),
    ("moving_average", RAMP, 6.01),
    ("kalman", RAMP, 0.2),
    ("arima", RAMP, 0.5),
    ("constant", PERIODIC, 11.0),
    ("kalman", PERIODIC, 25.0),
    ("arima", PERIODIC, 1.0),
]


@pytest.mark.parametrize(("name", "series", "bound"), CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_error_bounds(name: str, series: tuple[float, ...], bound: float) -> None:
    tail = errors(name, series)[-10:]
    assert tail.mean() <= bound, f"{name}: mean error {tail.mean():.3f} over {bound}"


def test_trend_models_beat_constant_on_a_ramp() -> None:
    constant = errors("constant", RAMP)[-10:].mean()
    assert errors("kalman", RAMP)[-10:].mean() < constant / 5
    assert errors("arima", RAMP)[-10:].mean() < constant / 5


def test_arima_learns_a_period_that_constant_cannot() -> None:
    assert errors("arima", PERIODIC)[-10:].mean() < errors("constant", PERIODIC)[-10:].mean() / 5


def test_kalman_settles_after_a_step() -> None:
    p = KalmanPredictor()
    for v in STEP:
        p.add(v)
    assert abs(p.predict() - 50) < 1.0


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_constant_until_warmed_up(name: str) -> None:
    p = new_predictor(name)
    assert math.isnan(p.predict())
    p.add(7.0)
    assert not p.warmed_up or name == "constant"
    assert p.predict() == 7.0
    p.add(9.0)
    if not p.warmed_up:
        assert p.predict() == 9.0


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_leading_idle_points_and_nan_are_skipped(name: str) -> None:
    p = new_predictor(name)
    for v in (0.0, 0.0, math.nan, 0.0):
        p.add(v)
    assert math.isnan(p.predict())
    p.add(5.0)
    p.add(0.0)  # an idle interval after traffic is a real observation
    assert p.predict() == 0.0 or p.warmed_up


def test_predictions_are_never_negative() -> None:
    p = KalmanPredictor(min_points=2)
    for v in (100.0, 60.0, 20.0, 1.0):
        p.add(v)
    assert p.predict() >= 0.0


def test_arima_falls_back_to_last_value_on_a_constant_series() -> None:
    p = ArimaPredictor(min_points=4)
    for _ in range(10):
        p.add(3.0)
    assert p.predict() == 3.0


def test_moving_average_window() -> None:
    p = MovingAveragePredictor(window=3, min_points=1)
    for v in (1.0, 2.0, 3.0, 10.0):
        p.add(v)
    assert p.predict() == pytest.approx(5.0)


def test_unknown_predictor_names_the_choices() -> None:
    with pytest.raises(ValueError, match="constant, moving_average, kalman, arima"):
        new_predictor("prophet")
    assert ConstantPredictor().name() == "constant"
