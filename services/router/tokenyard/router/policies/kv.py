from __future__ import annotations

import random
from collections.abc import Sequence

from tokenyard.router.policies.base import Candidate, RoutingContext
from tokenyard.router.policies.cost import costs, select
from tokenyard.router.policies.modes import RoutingMode


class KvAware:
    """Lowest cost from cached-prefix overlap, predicted load and cache pressure: the forecast of
    what each rank's cache keeps and what a placement evicts (see :mod:`tokenyard.router.policies.cost`).
    """

    # The scheduler fills the cache-pressure fields of the candidates' states for this policy only.
    uses_pressure = True

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def name(self) -> str:
        return RoutingMode.KV

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        values = costs(
            [c.state for c in candidates],
            ctx.isl_tokens,
            ctx.block_size,
            ctx.knobs,
            pressure=True,
            output_blocks=ctx.output_blocks,
        )
        for c, v in zip(candidates, values, strict=True):
            c.cost = v
        return candidates[select(values, ctx.knobs.temperature, self._rng)]


class KvClassic:
    """The reference's cost function: cached-prefix overlap against predicted load, nothing else."""

    uses_pressure = False

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def name(self) -> str:
        return RoutingMode.KV_CLASSIC

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        values = costs([c.state for c in candidates], ctx.isl_tokens, ctx.block_size, ctx.knobs)
        for c, v in zip(candidates, values, strict=True):
            c.cost = v
        return candidates[select(values, ctx.knobs.temperature, self._rng)]
