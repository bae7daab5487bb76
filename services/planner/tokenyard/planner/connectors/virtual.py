"""The ``virtual`` connector: decisions go to discovery; an outside agent scales and acknowledges.

The planner publishes each decision as a record of service ``scaling-decision`` (one per
planner, under its lease) whose metadata holds ``decision_id`` and ``replicas.<pool>`` for every
pool. An agent watches those records, scales however it can, and acknowledges by registering
(or updating) a record of service ``scaling-agent`` whose metadata holds
``scaled_decision_id``. The planner considers the action done once some agent acknowledged an
id at least as large as its decision's, polling every ``poll_interval_s``, and gives up after
``max_wait_s``. Replica counts are the workers discovery sees.

:class:`VirtualAgent` is that agent's side, for agents written in Python (and the tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from tokenyard.common.discovery import Discovery, DiscoveryError, Instance, new_instance_id
from tokenyard.planner.connectors.base import ConnectorError, count_workers
from tokenyard.planner.pools import Pool

log = logging.getLogger(__name__)

DECISION_SERVICE = "scaling-decision"
AGENT_SERVICE = "scaling-agent"


@dataclass(frozen=True)
class VirtualDecision:
    planner_instance: int
    decision_id: int
    replicas: dict[Pool, int]


def decision_of(instance: Instance) -> VirtualDecision | None:
    """The decision a ``scaling-decision`` record carries; None when it is malformed."""
    try:
        decision_id = int(instance.metadata["decision_id"])
        replicas = {
            Pool(key.removeprefix("replicas.")): int(value)
            for key, value in instance.metadata.items()
            if key.startswith("replicas.")
        }
    except (KeyError, ValueError):
        return None
    return VirtualDecision(instance.instance_id, decision_id, replicas)


class VirtualConnector:
    def __init__(
        self,
        discovery: Discovery,
        address: Callable[[], str],
        *,
        poll_interval_s: float = 10.0,
        max_wait_s: float = 1800.0,
    ) -> None:
        self._discovery = discovery
        self._address = address
        self._instance_id = new_instance_id()
        self.poll_interval_s = poll_interval_s
        self.max_wait_s = max_wait_s

    def name(self) -> str:
        return "virtual"

    async def current_replicas(self) -> dict[Pool, int]:
        return await count_workers(self._discovery)

    async def publish(self, target: dict[Pool, int], decision_id: int) -> None:
        metadata = {"decision_id": str(decision_id)}
        metadata |= {f"replicas.{pool.value}": str(n) for pool, n in target.items()}
        record = Instance(
            instance_id=self._instance_id,
            service=DECISION_SERVICE,
            role="",
            address=self._address(),
            metadata=metadata,
        )
        try:
            await self._discovery.register(record)
        except DiscoveryError as exc:
            raise ConnectorError(f"cannot publish decision {decision_id} in discovery: {exc}") from None

    async def acknowledged(self) -> int:
        """The largest decision id any agent acknowledged (0 when none)."""
        try:
            agents = await self._discovery.instances(AGENT_SERVICE)
        except DiscoveryError as exc:
            raise ConnectorError(f"cannot read acknowledgements from discovery: {exc}") from None
        best = 0
        for agent in agents:
            try:
                best = max(best, int(agent.metadata.get("scaled_decision_id", "0")))
            except ValueError:
                log.warning(
                    "ignoring scaling agent %d: scaled_decision_id is not a number", agent.instance_id
                )
        return best

    async def scale(self, target: dict[Pool, int], decision_id: int) -> None:
        await self.publish(target, decision_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while True:
            if await self.acknowledged() >= decision_id:
                return
            if loop.time() > deadline:
                raise ConnectorError(
                    f"no scaling agent acknowledged decision {decision_id} within {self.max_wait_s:.0f}s"
                )
            await asyncio.sleep(self.poll_interval_s)

    async def close(self) -> None:
        try:
            await self._discovery.deregister(self._instance_id)
        except DiscoveryError as exc:
            log.warning("could not withdraw the last decision from discovery: %s", exc)


class VirtualAgent:
    """An outside agent: reads the planner's decisions, acknowledges them once applied."""

    def __init__(self, discovery: Discovery, address: str = "agent:0") -> None:
        self._discovery = discovery
        self._address = address
        self._instance_id = new_instance_id()

    async def latest(self) -> VirtualDecision | None:
        decisions = [decision_of(i) for i in await self._discovery.instances(DECISION_SERVICE)]
        found = [d for d in decisions if d is not None]
        return max(found, key=lambda d: d.decision_id) if found else None

    async def wait_for_decision(
        self, after: int = 0, timeout: float = 30.0, poll: float = 0.05
    ) -> VirtualDecision:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            decision = await self.latest()
            if decision is not None and decision.decision_id > after:
                return decision
            if loop.time() > deadline:
                raise TimeoutError(f"no decision after {after} within {timeout}s")
            await asyncio.sleep(poll)

    async def acknowledge(self, decision_id: int) -> None:
        await self._discovery.register(
            Instance(
                instance_id=self._instance_id,
                service=AGENT_SERVICE,
                role="",
                address=self._address,
                metadata={"scaled_decision_id": str(decision_id)},
            )
        )
