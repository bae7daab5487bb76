from __future__ import annotations

import random
from collections.abc import Sequence

from tokenyard.router.policies.base import Candidate, RoutingContext
from tokenyard.router.policies.modes import RoutingMode


class PowerOfTwo:
    """Two candidates at random; the one with fewer active requests (a coin decides ties)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def name(self) -> str:
        return RoutingMode.POWER_OF_TWO

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        na, nb = a.state.active_requests, b.state.active_requests
        if na == nb:
            return a if self._rng.random() < 0.5 else b
        return a if na < nb else b
