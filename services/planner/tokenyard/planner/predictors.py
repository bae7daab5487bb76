"""Load predictors: the next interval's value of a series (request count, ISL, OSL).

One interface, four models. Every predictor skips the idle points a series starts with (a
deployment that saw no traffic yet says nothing about the next burst) and answers like
:class:`ConstantPredictor` (the last value) until it has seen enough points to do better.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np


class Predictor(Protocol):
    def name(self) -> str:
        """The name settings and metric labels use."""
        ...

    def add(self, value: float) -> None:
        """Record the value observed over the interval that just ended; NaN is skipped."""
        ...

    def predict(self) -> float:
        """The expected value over the next interval; NaN before any value was seen."""
        ...

    @property
    def warmed_up(self) -> bool:
        """Whether the model (rather than its constant fallback) answers :meth:`predict`."""
        ...


class _Series:
    """What every predictor shares: the kept window, idle-prefix skipping, the constant fallback."""

    kind = "constant"

    def __init__(self, *, window: int = 100, min_points: int = 1) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if min_points < 1:
            raise ValueError("min_points must be at least 1")
        self.window = window
        self.min_points = min_points
        self.values: deque[float] = deque(maxlen=window)
        self._started = False

    def name(self) -> str:
        return self.kind

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            return
        if not self._started and value <= 0:
            return
        self._started = True
        self.values.append(float(value))
        self._observed()

    def _observed(self) -> None:
        """Hook for models that refit when a value arrives."""

    @property
    def warmed_up(self) -> bool:
        return len(self.values) >= self.min_points

    def predict(self) -> float:
        if not self.values:
            return math.nan
        if not self.warmed_up:
            return self.values[-1]
        value = self._model_predict()
        # A model that diverges must not ask for negative or infinite traffic.
        if not math.isfinite(value):
            return self.values[-1]
        return max(0.0, value)

    def _model_predict(self) -> float:
        return self.values[-1]


class ConstantPredictor(_Series):
    """Next = last."""

    kind = "constant"


class MovingAveragePredictor(_Series):
    """Next = mean of the last ``window`` values."""

    kind = "moving_average"

    def __init__(self, *, window: int = 5, min_points: int = 2) -> None:
        super().__init__(window=window, min_points=min_points)

    def _model_predict(self) -> float:
        return float(np.mean(self.values))


class KalmanPredictor(_Series):
    """A local linear trend (level and slope) filtered with a Kalman filter.

    State ``[level, trend]``; each interval the level moves by the trend. ``q_level`` and
    ``q_trend`` are the process noise variances, ``r`` the observation noise variance, all in the
    series' units squared (or log1p units with ``log1p``). The prediction is one step ahead.
    """

    kind = "kalman"

    def __init__(
        self,
        *,
        q_level: float = 1.0,
        q_trend: float = 0.1,
        r: float = 10.0,
        min_points: int = 5,
        log1p: bool = False,
    ) -> None:
        super().__init__(window=1000, min_points=min_points)
        if min(q_level, q_trend, r) < 0 or r == 0:
            raise ValueError("kalman noise variances must be >= 0 (r > 0)")
        self.q = np.diag([q_level, q_trend])
        self.r = r
        self.log1p = log1p
        self._x: np.ndarray | None = None
        self._p = np.eye(2) * 1e3
        self._f = np.array([[1.0, 1.0], [0.0, 1.0]])
        self._h = np.array([[1.0, 0.0]])

    def _observed(self) -> None:
        z = math.log1p(self.values[-1]) if self.log1p else self.values[-1]
        if self._x is None:
            self._x = np.array([z, 0.0])
            return
        x = self._f @ self._x
        p = self._f @ self._p @ self._f.T + self.q
        s = float((self._h @ p @ self._h.T)[0, 0]) + self.r
        k = (p @ self._h.T)[:, 0] / s
        x = x + k * (z - x[0])
        self._p = (np.eye(2) - np.outer(k, self._h[0])) @ p
        self._x = x

    def _model_predict(self) -> float:
        assert self._x is not None
        nxt = float((self._f @ self._x)[0])
        return math.expm1(nxt) if self.log1p else nxt


# L-BFGS iterations per fit: short, trend-like series make the optimiser crawl for seconds,
# and a rougher fit forecasts one step nearly as well.
_ARIMA_MAXITER = 30

# Orders the ARIMA predictor tries, by AIC. Kept short: every candidate is a fit per
# reselection, and a fit takes 0.05-1 s of CPU (higher orders cost the most).
_ARIMA_ORDERS: tuple[tuple[int, int, int], ...] = (
    (1, 0, 0),
    (2, 0, 0),
    (0, 1, 1),
    (1, 1, 0),
    (1, 1, 1),
)


class ArimaPredictor(_Series):
    """ARIMA(p, d, q) fitted with statsmodels, the order chosen by AIC.

    The order is chosen and its parameters fitted every ``reselect_every`` points (and whenever
    the fit fails); in between, new points update the fitted model's state without refitting,
    which costs milliseconds instead of a search. When the best order degenerates to (0, d, 0)
    (a random walk or a constant: no structure found) the search is repeated on ``log1p`` of the
    series, which often finds structure in bursty counts; if that is still degenerate, the
    prediction is the last value.
    """

    kind = "arima"

    def __init__(self, *, window: int = 60, min_points: int = 8, reselect_every: int = 20) -> None:
        super().__init__(window=window, min_points=min_points)
        self.reselect_every = max(1, reselect_every)
        self.order: tuple[int, int, int] | None = None
        self.log_space = False
        self._result: Any = None
        self._since_select = 0
        self._forecast = math.nan

    def _observed(self) -> None:
        if not self.warmed_up:
            return
        self._since_select += 1
        if self._result is None or self._since_select >= self.reselect_every:
            self._select()
            return
        value = self.values[-1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                point = math.log1p(value) if self.log_space else value
                self._result = self._result.append([point], refit=False)
                self._forecast = _unlog(float(self._result.forecast(1)[0]), self.log_space)
        except (ValueError, np.linalg.LinAlgError, IndexError):
            self._select()

    def _series(self, log_space: bool) -> np.ndarray:
        y = np.asarray(self.values, dtype=np.float64)
        return np.log1p(y) if log_space else y

    def _select(self) -> None:
        self._since_select = 0
        for log_space in (False, True):
            best: tuple[float, tuple[int, int, int], Any] | None = None
            y = self._series(log_space)
            for order in _ARIMA_ORDERS:
                result = _arima_fit(y, order)
                if (
                    result is not None
                    and math.isfinite(result.aic)
                    and (best is None or result.aic < best[0])
                ):
                    best = (float(result.aic), order, result)
            if best is None:
                break  # constant series, or nothing fits: the last value it is
            _, order, result = best
            if order[0] == 0 and order[2] == 0 and not log_space:
                continue  # degenerate: try log1p before settling for it
            self.order, self.log_space, self._result = order, log_space, result
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._forecast = _unlog(float(result.forecast(1)[0]), log_space)
            return
        self.order, self.log_space, self._result, self._forecast = None, False, None, math.nan

    def _model_predict(self) -> float:
        if self.order is None or not math.isfinite(self._forecast):
            return self.values[-1]
        if self.order[0] == 0 and self.order[2] == 0:
            return self.values[-1]
        return self._forecast


def _unlog(value: float, log_space: bool) -> float:
    if not log_space:
        return value
    return math.expm1(value) if value < 50 else math.inf


def _arima_fit(y: np.ndarray, order: tuple[int, int, int]) -> Any:
    """The fitted model of ``order`` on ``y``; None when the series is constant or the fit fails."""
    from statsmodels.tsa.arima.model import ARIMA

    if np.ptp(y) == 0:
        return None  # statsmodels cannot fit a constant series; a constant predicts itself
    try:
        with warnings.catch_warnings():
            # Convergence and frequency warnings are expected on short, noisy series.
            warnings.simplefilter("ignore")
            trend = "c" if order[1] == 0 else "n"
            return ARIMA(y, order=order, trend=trend).fit(method_kwargs={"maxiter": _ARIMA_MAXITER})
    except (ValueError, np.linalg.LinAlgError, IndexError):
        return None


PREDICTORS: dict[str, Callable[[], Predictor]] = {
    "constant": ConstantPredictor,
    "moving_average": MovingAveragePredictor,
    "kalman": KalmanPredictor,
    "arima": ArimaPredictor,
}


def new_predictor(name: str) -> Predictor:
    try:
        return PREDICTORS[name]()
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}: choose one of {', '.join(PREDICTORS)}") from None
