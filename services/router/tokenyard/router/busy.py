"""Busy detection: which workers should get no new request for now.

A rank is busy when any configured threshold is exceeded (decode-block fraction of its KV pool,
prefill tokens in flight, or prefill tokens as a fraction of its batch budget); a worker is busy
only when all of its ranks are. Thresholds left unset are off, and with none set nothing is ever
busy. The router answers "overloaded" when every eligible worker is busy, which is a different
answer from "no usable worker" (see :mod:`tokenyard.router.scheduler`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BusyThresholds:
    # Fraction (0..1] of the rank's KV blocks referenced by active requests.
    active_decode_blocks: float | None = None
    # Prompt tokens admitted but not yet computed.
    active_prefill_tokens: int | None = None
    # Same, as a fraction of the rank's max_num_batched_tokens (ignored while that is unknown).
    active_prefill_tokens_frac: float | None = None

    @property
    def enabled(self) -> bool:
        return (
            self.active_decode_blocks is not None
            or self.active_prefill_tokens is not None
            or self.active_prefill_tokens_frac is not None
        )


@dataclass(frozen=True, slots=True)
class RankPressure:
    decode_blocks: float
    total_blocks: int
    prefill_tokens: float
    max_batched_tokens: int


def rank_busy(p: RankPressure, t: BusyThresholds) -> bool:
    if (
        t.active_decode_blocks is not None
        and p.total_blocks > 0
        and p.decode_blocks / p.total_blocks > t.active_decode_blocks
    ):
        return True
    if t.active_prefill_tokens is not None and p.prefill_tokens > t.active_prefill_tokens:
        return True
    return (
        t.active_prefill_tokens_frac is not None
        and p.max_batched_tokens > 0
        and p.prefill_tokens > t.active_prefill_tokens_frac * p.max_batched_tokens
    )


def worker_busy(ranks: Iterable[RankPressure], t: BusyThresholds) -> bool:
    """True when every rank is busy (a worker with no known rank is not busy)."""
    seen = False
    for p in ranks:
        seen = True
        if not rank_busy(p, t):
            return False
    return seen
