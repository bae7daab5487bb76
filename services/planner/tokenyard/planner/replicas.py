"""What the planner observes: replicas of each component, from discovery.

The first planner is advisory: it reports what runs and holds. Load prediction, the performance
model and connectors that act on decisions grow from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass

from tokenyard.common.discovery import Discovery, DiscoveryError, Instance, WatchEventKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    component: str
    decision_id: int
    current_replicas: int
    desired_replicas: int
    decided_at_ns: int
    detail: str


def component_of(instance: Instance) -> str:
    """Workers scale per role (prefill and decode pools separately); other services as a whole."""
    if instance.service == "worker":
        role = instance.model_card.role if instance.model_card else instance.role
        return f"worker-{role or 'aggregated'}"
    return instance.service


class ReplicaObserver:
    def __init__(self, discovery: Discovery) -> None:
        self._discovery = discovery
        self._instances: dict[int, Instance] = {}
        self._task: asyncio.Task[None] | None = None
        self._decision_id = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="replica-observer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            try:
                async for event in self._discovery.watch():
                    if event.kind is WatchEventKind.REMOVED:
                        self._instances.pop(event.instance.instance_id, None)
                    else:
                        self._instances[event.instance.instance_id] = event.instance
            except DiscoveryError as exc:
                log.warning("discovery watch failed, retrying in 1s: %s", exc)
                await asyncio.sleep(1.0)

    def replicas(self) -> dict[str, int]:
        return dict(Counter(component_of(i) for i in self._instances.values()))

    def decisions(self, component: str = "") -> list[Decision]:
        self._decision_id += 1
        now = time.time_ns()
        counts = self.replicas()
        return [
            Decision(name, self._decision_id, n, n, now, "advisory: holding the observed replica count")
            for name, n in sorted(counts.items())
            if not component or name == component
        ]
