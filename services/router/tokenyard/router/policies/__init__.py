"""Routing policies behind one Protocol, one module each, keyed by :class:`RoutingMode`.

The mode's value is its name on the command line and the ``mode`` label of the decision metrics;
its wire enum derives from it (:mod:`tokenyard.router.servicer`).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tokenyard.router.policies.base import Candidate, RoutingContext, RoutingPolicy
from tokenyard.router.policies.direct import Direct
from tokenyard.router.policies.kv import KvAware, KvClassic
from tokenyard.router.policies.least_loaded import LeastLoaded
from tokenyard.router.policies.modes import RoutingMode
from tokenyard.router.policies.power_of_two import PowerOfTwo
from tokenyard.router.policies.random_choice import RandomChoice
from tokenyard.router.policies.round_robin import RoundRobin

POLICIES: dict[RoutingMode, Callable[[random.Random], RoutingPolicy]] = {
    RoutingMode.KV: KvAware,
    RoutingMode.KV_CLASSIC: KvClassic,
    RoutingMode.ROUND_ROBIN: RoundRobin,
    RoutingMode.RANDOM: RandomChoice,
    RoutingMode.POWER_OF_TWO: PowerOfTwo,
    RoutingMode.LEAST_LOADED: LeastLoaded,
    RoutingMode.DIRECT: Direct,
}

MODES = tuple(m.value for m in RoutingMode)


def make_policy(mode: RoutingMode | str, rng: random.Random | None = None) -> RoutingPolicy:
    """The policy of ``mode`` (ValueError names the known modes for an unknown one)."""
    return POLICIES[RoutingMode.parse(mode)](rng or random.Random())


__all__ = ["MODES", "POLICIES", "Candidate", "RoutingContext", "RoutingMode", "RoutingPolicy", "make_policy"]
