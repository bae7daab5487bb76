"""What one worker can do, as the throughput loop asks it: prefill time and decode step time.

Two sources: a measured profile (:class:`ProfilePerfModel`), or the regressions the load loop
learns online from per-step engine metrics (:class:`RegressionPerfModel`, in ``load.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np

from tokenyard.planner.profile import Array, Profile


class PerfModel(Protocol):
    @property
    def max_kv_tokens(self) -> int: ...

    @property
    def max_num_seqs(self) -> int: ...

    @property
    def max_num_batched_tokens(self) -> int: ...

    def prefill_ms(self, tokens: float) -> float:
        """Time to compute one prompt of ``tokens`` new tokens on an idle worker (chunked as the
        engine would), ms."""
        ...

    def itl_ms(self, concurrency: float, context: float) -> float:
        """Decode step time with ``concurrency`` requests at a mean context of ``context`` tokens, ms."""
        ...


def _segment(axis: Array, x: float) -> tuple[int, float]:
    """The cell to interpolate in (an end cell when ``x`` is outside) and x's fraction along it."""
    i = int(np.clip(np.searchsorted(axis, x, side="right") - 1, 0, axis.size - 2))
    x0, x1 = float(axis[i]), float(axis[i + 1])
    return i, (x - x0) / (x1 - x0)


class ProfilePerfModel:
    """Linear interpolation of the prefill sweep, bilinear of the decode grid; both extrapolate
    linearly past the swept range (never below a tenth of the smallest measured time)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._prefill_floor = float(np.min(profile.prefill_ttft_ms)) / 10
        self._decode_floor = float(np.min(profile.decode_itl)) / 10

    @property
    def max_kv_tokens(self) -> int:
        return self.profile.max_kv_tokens

    @property
    def max_num_seqs(self) -> int:
        return self.profile.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self.profile.max_num_batched_tokens

    def _prefill_one(self, tokens: float) -> float:
        p = self.profile
        i, t = _segment(p.prefill_isl, tokens)
        y0, y1 = float(p.prefill_ttft_ms[i]), float(p.prefill_ttft_ms[i + 1])
        return max(self._prefill_floor, y0 + t * (y1 - y0))

    def prefill_ms(self, tokens: float) -> float:
        if tokens <= 0:
            return 0.0
        # Within the sweep the measurement already includes the engine's chunking.
        if tokens <= float(self.profile.prefill_isl[-1]):
            return self._prefill_one(tokens)
        return chunked(tokens, self.max_num_batched_tokens, self._prefill_one)

    def itl_ms(self, concurrency: float, context: float) -> float:
        p = self.profile
        kv = max(1.0, concurrency) * context
        i, t = _segment(p.decode_active_kv_tokens, kv)
        j, u = _segment(p.decode_context_length, context)
        g = p.decode_itl
        value = (
            (1 - t) * (1 - u) * g[i, j]
            + t * (1 - u) * g[i + 1, j]
            + (1 - t) * u * g[i, j + 1]
            + t * u * g[i + 1, j + 1]
        )
        return max(self._decode_floor, float(value))


def chunked(tokens: float, chunk: int, step_ms: Callable[[float], float]) -> float:
    """Total time of a prompt computed in pieces of at most ``chunk`` tokens."""
    full = math.floor(tokens / chunk)
    rest = tokens - full * chunk
    total = full * step_ms(float(chunk)) if full else 0.0
    return total + (step_ms(rest) if rest > 0 else 0.0)
