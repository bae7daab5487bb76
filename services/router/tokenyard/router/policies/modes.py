"""The routing modes, declared once.

Everything else derives from :class:`RoutingMode`: the policy registry is keyed by it
(:data:`tokenyard.router.policies.POLICIES`), the router's ``--mode`` setting takes its values,
and the wire enum ``tokenyard.api.router.v1.RoutingMode`` maps to it by name
(``ROUTING_MODE_<NAME>``, see :mod:`tokenyard.router.servicer`). A test checks that the three
agree, so a mode added in one place and not the others fails there instead of as INTERNAL at
the first request that names it.
"""

from __future__ import annotations

from enum import StrEnum


class RoutingMode(StrEnum):
    """The value is the mode's name on the command line and in the ``mode`` metric label."""

    # Cache overlap, predicted load and cache pressure: which worker keeps a prefix, what a
    # placement evicts, session history (tokenyard.router.policies.kv).
    KV = "kv"
    # The reference's cost function alone (overlap credit against predicted load).
    KV_CLASSIC = "kv-classic"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    POWER_OF_TWO = "power-of-two"
    LEAST_LOADED = "least-loaded"
    # The request pins the worker.
    DIRECT = "direct"

    @classmethod
    def parse(cls, name: str) -> RoutingMode:
        try:
            return cls(name)
        except ValueError:
            known = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown routing mode {name!r}; known: {known}") from None
