"""The models this frontend can serve, learned from the workers' model cards in discovery.

A model stays *known* after its last worker left: asking for it then is "temporarily
unavailable" (503), not "no such model" (404), which is what a client retrying through a
worker restart should hear.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenyard.common.discovery import Instance, ModelCard, WatchEventKind
from tokenyard.common.errors import NotFound, Unavailable

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    card: ModelCard
    instances: dict[int, Instance] = field(default_factory=dict)


class ModelRegistry:
    """Live view of ``model name -> workers serving it``, fed with discovery events."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._on_model: list[Callable[[ModelCard], None]] = []
        self._on_worker_left: list[Callable[[Instance], None]] = []

    def on_model(self, listener: Callable[[ModelCard], None]) -> None:
        """Called with a model's card when the model first appears (or its card changes)."""
        self._on_model.append(listener)

    def on_worker_left(self, listener: Callable[[Instance], None]) -> None:
        self._on_worker_left.append(listener)

    def models(self) -> dict[str, ModelCard]:
        """Models with at least one live worker."""
        return {name: m.card for name, m in self._models.items() if m.instances}

    def get(self, name: str) -> ServedModel | None:
        model = self._models.get(name)
        return model if model is not None and model.instances else None

    def is_known(self, name: str) -> bool:
        return name in self._models

    def card(self, name: str) -> ModelCard:
        """The card of a servable model; NotFound for a model never seen, Unavailable for one
        whose workers are all gone."""
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"the model {name!r} does not exist")
        if not model.instances:
            raise Unavailable(f"no worker serves the model {name!r} at the moment")
        return model.card

    def apply(self, kind: WatchEventKind, instance: Instance) -> None:
        card = instance.model_card
        if card is None:
            return
        if kind is WatchEventKind.REMOVED:
            model = self._models.get(card.model)
            if model is not None and model.instances.pop(instance.instance_id, None) is not None:
                for left in self._on_worker_left:
                    left(instance)
            return
        # Prefill-only workers take no requests from clients; they do not make a model servable.
        if card.role == "prefill":
            return
        model = self._models.get(card.model)
        changed = model is None or model.card != card
        if model is None:
            model = self._models[card.model] = ServedModel(card)
            log.info(
                "model %s available (tokenizer %s, block size %d)",
                card.model,
                card.tokenizer,
                card.block_size,
            )
        elif model.card != card:
            log.warning("workers of model %s advertise different cards; using the newest", card.model)
            model.card = card
        model.instances[instance.instance_id] = instance
        if changed:
            for listener in self._on_model:
                listener(card)
