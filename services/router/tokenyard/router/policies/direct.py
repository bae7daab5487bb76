from __future__ import annotations

import random
from collections.abc import Sequence

from tokenyard.router.policies.base import Candidate, RoutingContext
from tokenyard.router.policies.cost import select_min
from tokenyard.router.policies.modes import RoutingMode


class Direct:
    """The caller pinned the worker (the router narrowed the candidates to its ranks); among
    several ranks, the one with fewest active requests."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def name(self) -> str:
        return RoutingMode.DIRECT

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        return candidates[select_min([c.state.active_requests for c in candidates], self._rng)]
