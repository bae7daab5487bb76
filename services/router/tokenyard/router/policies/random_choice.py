from __future__ import annotations

import random
from collections.abc import Sequence

from tokenyard.router.policies.base import Candidate, RoutingContext
from tokenyard.router.policies.modes import RoutingMode


class RandomChoice:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def name(self) -> str:
        return RoutingMode.RANDOM

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        return self._rng.choice(candidates)
