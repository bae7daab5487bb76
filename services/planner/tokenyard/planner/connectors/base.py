"""The seam between decisions and the world: a connector reports ready replicas and applies counts."""

from __future__ import annotations

from typing import Protocol

from tokenyard.common.discovery import Discovery, DiscoveryError, Instance
from tokenyard.planner.pools import Pool


class ConnectorError(Exception):
    """Scaling failed or cannot be done; the message says which pool and why (one line)."""


class Connector(Protocol):
    def name(self) -> str:
        """``local``, ``kubernetes``, ``virtual`` or ``none`` (metric labels, status)."""
        ...

    async def current_replicas(self) -> dict[Pool, int]:
        """Ready replicas per pool; raises :class:`ConnectorError` when they cannot be read."""
        ...

    async def scale(self, target: dict[Pool, int], decision_id: int) -> None:
        """Bring each pool to ``target`` and return once the replicas are in place.

        The planner runs this as one action (never two at once) under its own timeout, and
        cancels it when that runs out; a connector cleans up what it started when cancelled.
        """
        ...

    async def close(self) -> None: ...


def pool_of(instance: Instance) -> Pool | None:
    """The pool of a worker instance (its model card's role), None for anything else."""
    if instance.service != "worker":
        return None
    role = instance.model_card.role if instance.model_card is not None else instance.role
    try:
        return Pool(role or Pool.AGGREGATED.value)
    except ValueError:
        return None


async def workers_by_pool(discovery: Discovery) -> dict[Pool, list[Instance]]:
    """Registered workers per pool (a worker registers once its engine is ready)."""
    try:
        instances = await discovery.instances("worker")
    except DiscoveryError as exc:
        raise ConnectorError(f"cannot read the workers from discovery: {exc}") from None
    pools: dict[Pool, list[Instance]] = {pool: [] for pool in Pool}
    for instance in instances:
        pool = pool_of(instance)
        if pool is not None:
            pools[pool].append(instance)
    return pools


async def count_workers(discovery: Discovery) -> dict[Pool, int]:
    return {pool: len(found) for pool, found in (await workers_by_pool(discovery)).items()}


class NoConnector:
    """Advisory only: reports the replicas discovery sees, refuses to scale."""

    def __init__(self, discovery: Discovery) -> None:
        self._discovery = discovery

    def name(self) -> str:
        return "none"

    async def current_replicas(self) -> dict[Pool, int]:
        return await count_workers(self._discovery)

    async def scale(self, target: dict[Pool, int], decision_id: int) -> None:
        raise ConnectorError("no connector to apply decisions (--connector local, kubernetes or virtual)")

    async def close(self) -> None:
        return None
