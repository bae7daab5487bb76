"""How long an engine step takes: prefill of the batch's new prompt tokens, then one decode.

Times are milliseconds of model time; the engine divides them by its speedup ratios.

* :class:`PolynomialPerfModel` is the reference mocker's default fit.
* :class:`InterpolatedPerfModel` reads a profile: prefill time over total new tokens in the
  batch (1-D, linear, extrapolated past both ends), decode time over a grid of active KV tokens
  by mean context length (2-D, bilinear, extrapolated). The profile is an NPZ with the keys
  ``prefill_isl``, ``prefill_ttft_ms``, ``decode_active_kv_tokens``, ``decode_context_length``,
  ``decode_itl`` (shape ``(len(active_kv), len(context))``), or a JSON object with the same keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

MIN_DECODE_MS = 1.0
"""A step that emits tokens takes at least this long, so token times never collapse onto one instant."""


class PerfModel(Protocol):
    def prefill_ms(self, batch_size: int, mean_isl: float, mean_prefix: float) -> float:
        """Prefill time of ``batch_size`` prompts of ``mean_isl`` tokens, ``mean_prefix`` of them already computed."""
        ...

    def decode_ms(
        self, batch_size: int, active_kv_tokens: int, mean_context_len: float, total_kv_tokens: int
    ) -> float:
        """Time of one decode step that emits a token for each of ``batch_size`` requests."""
        ...


class PolynomialPerfModel:
    """The reference mocker's default: quadratic in new prompt tokens, quadratic in KV utilisation."""

    def prefill_ms(self, batch_size: int, mean_isl: float, mean_prefix: float) -> float:
        new_tokens = batch_size * max(0.0, mean_isl - mean_prefix)
        if new_tokens <= 0:
            return 0.0
        return 4.209989e-07 * new_tokens**2 + 1.518344e-02 * new_tokens + 16.50142

    def decode_ms(
        self, batch_size: int, active_kv_tokens: int, mean_context_len: float, total_kv_tokens: int
    ) -> float:
        if batch_size <= 0:
            return 0.0
        usage = min(1.0, active_kv_tokens / total_kv_tokens) if total_kv_tokens > 0 else 1.0
        return max(MIN_DECODE_MS, -25.74 * usage**2 + 54.01 * usage + 5.74)


_PROFILE_KEYS = (
    "prefill_isl",
    "prefill_ttft_ms",
    "decode_active_kv_tokens",
    "decode_context_length",
    "decode_itl",
)


def _axis(values: NDArray[np.float64], name: str) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"profile key {name!r} must be a 1-D array of at least 2 points")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"profile key {name!r} has non-finite values")
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    if np.any(np.diff(ordered) == 0):
        raise ValueError(f"profile key {name!r} has repeated points")
    return ordered, order


def _segment(axis: NDArray[np.float64], x: float) -> tuple[int, float]:
    """The grid cell to interpolate in (the end cells when ``x`` is outside) and x's fraction along it."""
    i = int(np.clip(np.searchsorted(axis, x, side="right") - 1, 0, axis.size - 2))
    x0, x1 = float(axis[i]), float(axis[i + 1])
    return i, (x - x0) / (x1 - x0)


class InterpolatedPerfModel:
    def __init__(
        self,
        prefill_tokens: NDArray[np.float64],
        prefill_ms: NDArray[np.float64],
        decode_active_kv_tokens: NDArray[np.float64],
        decode_context_length: NDArray[np.float64],
        decode_itl_ms: NDArray[np.float64],
    ) -> None:
        self._prefill_x, order = _axis(np.asarray(prefill_tokens, dtype=np.float64), "prefill_isl")
        prefill_y = np.asarray(prefill_ms, dtype=np.float64)
        if prefill_y.shape != (self._prefill_x.size,):
            raise ValueError("prefill_ttft_ms must have one value per prefill_isl point")
        self._prefill_y = prefill_y[order]
        self._kv_axis, kv_order = _axis(
            np.asarray(decode_active_kv_tokens, dtype=np.float64), "decode_active_kv_tokens"
        )
        self._ctx_axis, ctx_order = _axis(
            np.asarray(decode_context_length, dtype=np.float64), "decode_context_length"
        )
        grid = np.asarray(decode_itl_ms, dtype=np.float64)
        if grid.shape != (self._kv_axis.size, self._ctx_axis.size):
            raise ValueError(
                f"decode_itl must have shape (len(decode_active_kv_tokens), len(decode_context_length)) = "
                f"{(self._kv_axis.size, self._ctx_axis.size)}, got {grid.shape}"
            )
        if not (np.all(np.isfinite(self._prefill_y)) and np.all(np.isfinite(grid))):
            raise ValueError("profile times must be finite")
        self._grid = grid[np.ix_(kv_order, ctx_order)]

    @classmethod
    def from_file(cls, path: str | Path) -> InterpolatedPerfModel:
        """Load an NPZ profile, or a JSON one (``.json``) with the same keys."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: a profile is a JSON object")
            arrays = {key: np.asarray(raw[key], dtype=np.float64) for key in _PROFILE_KEYS if key in raw}
        else:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: np.asarray(npz[key], dtype=np.float64) for key in _PROFILE_KEYS if key in npz}
        missing = [key for key in _PROFILE_KEYS if key not in arrays]
        if missing:
            raise ValueError(f"{path}: profile lacks {', '.join(missing)}")
        return cls(*(arrays[key] for key in _PROFILE_KEYS))

    def prefill_ms(self, batch_size: int, mean_isl: float, mean_prefix: float) -> float:
        new_tokens = batch_size * max(0.0, mean_isl - mean_prefix)
        if new_tokens <= 0:
            return 0.0
        i, t = _segment(self._prefill_x, new_tokens)
        y0, y1 = float(self._prefill_y[i]), float(self._prefill_y[i + 1])
        return max(0.0, y0 + t * (y1 - y0))

    def decode_ms(
        self, batch_size: int, active_kv_tokens: int, mean_context_len: float, total_kv_tokens: int
    ) -> float:
        if batch_size <= 0:
            return 0.0
        i, t = _segment(self._kv_axis, float(active_kv_tokens))
        j, u = _segment(self._ctx_axis, float(mean_context_len))
        g = self._grid
        value = (
            (1 - t) * (1 - u) * g[i, j]
            + t * (1 - u) * g[i + 1, j]
            + (1 - t) * u * g[i, j + 1]
            + t * u * g[i + 1, j + 1]
        )
        return max(MIN_DECODE_MS, float(value))


def load_perf_model(path: str | Path | None) -> PerfModel:
    """The model a configuration asks for: interpolated from ``path``, else the polynomial default."""
    return PolynomialPerfModel() if path is None else InterpolatedPerfModel.from_file(path)
