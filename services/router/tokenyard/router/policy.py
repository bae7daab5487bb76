"""Routing policies behind one Protocol; a small registry by name (the name labels metrics)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from tokenyard.common.discovery import Instance
from tokenyard.router.active import ActiveRequests


class RoutingPolicy(Protocol):
    def name(self) -> str: ...

    def select(self, candidates: Sequence[Instance], active: ActiveRequests) -> Instance:
        """Pick one of ``candidates`` (never empty)."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def name(self) -> str:
        return "round-robin"

    def select(self, candidates: Sequence[Instance], active: ActiveRequests) -> Instance:
        # Candidates come in registration order, so a shared counter spreads requests evenly
        # even when the set changes between calls.
        return candidates[next(self._counter) % len(candidates)]


class Random:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def name(self) -> str:
        return "random"

    def select(self, candidates: Sequence[Instance], active: ActiveRequests) -> Instance:
        return self._rng.choice(candidates)


POLICIES: dict[str, Callable[[], RoutingPolicy]] = {
    "round-robin": RoundRobin,
    "random": Random,
}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing mode {name!r}; known: {', '.join(POLICIES)}") from None
