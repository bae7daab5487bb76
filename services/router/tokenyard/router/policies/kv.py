from __future__ import annotations

import random
from collections.abc import Sequence

from tokenyard.router.cost import costs, select
from tokenyard.router.policies.base import Candidate, RoutingContext


class KvAware:
    """Lowest cost from cached-prefix overlap and predicted load (see :mod:`tokenyard.router.cost`)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def name(self) -> str:
        return "kv"

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        values = costs([c.state for c in candidates], ctx.isl_tokens, ctx.block_size, ctx.knobs)
        for c, v in zip(candidates, values, strict=True):
            c.cost = v
        return candidates[select(values, ctx.knobs.temperature, self._rng)]
