from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from tokenyard.router.policies.base import Candidate, RoutingContext
from tokenyard.router.policies.modes import RoutingMode


class RoundRobin:
    def __init__(self, rng: random.Random) -> None:
        self._counter = itertools.count()

    def name(self) -> str:
        return RoutingMode.ROUND_ROBIN

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        # Candidates come in registration order, so a shared counter spreads requests evenly
        # even when the set changes between calls.
        return candidates[next(self._counter) % len(candidates)]
