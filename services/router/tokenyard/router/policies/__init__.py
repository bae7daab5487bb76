"""Routing policies behind one Protocol, one module each, and a registry by name.

The name is the routing mode on the wire and the ``mode`` label of the decision metrics.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tokenyard.router.policies.base import Candidate, RoutingContext, RoutingPolicy
from tokenyard.router.policies.direct import Direct
from tokenyard.router.policies.kv import KvAware
from tokenyard.router.policies.least_loaded import LeastLoaded
from tokenyard.router.policies.power_of_two import PowerOfTwo
from tokenyard.router.policies.random_choice import RandomChoice
from tokenyard.router.policies.round_robin import RoundRobin

POLICIES: dict[str, Callable[[random.Random], RoutingPolicy]] = {
    "kv": KvAware,
    "round-robin": RoundRobin,
    "random": RandomChoice,
    "power-of-two": PowerOfTwo,
    "least-loaded": LeastLoaded,
    "direct": Direct,
}

MODES = tuple(POLICIES)


def make_policy(name: str, rng: random.Random | None = None) -> RoutingPolicy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing mode {name!r}; known: {', '.join(POLICIES)}") from None
    return factory(rng or random.Random())


__all__ = ["MODES", "POLICIES", "Candidate", "RoutingContext", "RoutingPolicy", "make_policy"]
