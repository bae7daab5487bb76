"""The models this frontend can serve, learned from the workers' model cards in discovery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from tokenyard.common.discovery import Discovery, DiscoveryError, Instance, ModelCard, WatchEventKind

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    card: ModelCard
    instances: dict[int, Instance] = field(default_factory=dict)


class ModelRegistry:
    """Live view of ``model name -> workers serving it``, kept by a discovery watch."""

    def __init__(self, discovery: Discovery) -> None:
        self._discovery = discovery
        self._models: dict[str, ServedModel] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="model-registry")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def models(self) -> dict[str, ModelCard]:
        return {name: m.card for name, m in self._models.items() if m.instances}

    def get(self, name: str) -> ServedModel | None:
        model = self._models.get(name)
        return model if model is not None and model.instances else None

    def apply(self, kind: WatchEventKind, instance: Instance) -> None:
        card = instance.model_card
        if card is None:
            return
        if kind is WatchEventKind.REMOVED:
            model = self._models.get(card.model)
            if model is not None:
                model.instances.pop(instance.instance_id, None)
            return
        model = self._models.setdefault(card.model, ServedModel(card))
        model.instances[instance.instance_id] = instance
        if model.card != card:
            log.warning("workers of model %s advertise different cards; using the newest", card.model)
            model.card = card

    async def _watch(self) -> None:
        while True:
            try:
                async for event in self._discovery.watch("worker"):
                    self.apply(event.kind, event.instance)
            except DiscoveryError as exc:
                log.warning("discovery watch failed, retrying: %s", exc)
                await asyncio.sleep(1.0)
