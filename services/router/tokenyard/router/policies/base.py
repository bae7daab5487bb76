"""What every routing policy sees: eligible candidates (one per worker rank) and the request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tokenyard.router.policies.cost import CostKnobs, RankState


@dataclass(slots=True)
class Candidate:
    """One eligible worker rank, with what the router predicts and knows about it."""

    worker_id: int
    dp_rank: int
    address: str
    state: RankState = field(default_factory=RankState)
    # Filled by the policy that scores (kv); 0 otherwise.
    cost: float = 0.0


@dataclass(frozen=True, slots=True)
class RoutingContext:
    """The request as the policies need it."""

    isl_tokens: int
    block_size: int
    request_blocks: int
    knobs: CostKnobs
    # Blocks the request is expected to generate (its expected output length; 0 when unknown).
    output_blocks: float = 0.0


class RoutingPolicy(Protocol):
    def name(self) -> str: ...

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        """Pick one of ``candidates`` (never empty; in registration order)."""
        ...
