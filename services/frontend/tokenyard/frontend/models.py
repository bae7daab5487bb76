"""The models this frontend can serve, learned from the workers' model cards in discovery.

A model stays *known* after its last worker left: asking for it then is "temporarily
unavailable" (503), not "no such model" (404), which is what a client retrying through a
worker restart should hear.

Workers serve a model in one of three roles. Aggregated and decode workers serve clients whole
(``instances``); prefill workers (``prefill``) only compute prompts for decode workers, so they
alone never make a model servable. A model is *split* while it has both prefill and decode
workers: the frontend then prefills its requests on the prefill pool and decodes them on the
decode pool (see :mod:`tokenyard.frontend.disagg`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tokenyard.common.discovery import Instance, ModelCard, WatchEventKind
from tokenyard.common.errors import NotFound, Unavailable

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    card: ModelCard
    # Workers that serve clients whole: aggregated and decode workers.
    instances: dict[int, Instance] = field(default_factory=dict)
    # Prefill workers.
    prefill: dict[int, Instance] = field(default_factory=dict)
    # Ids of the decode workers among ``instances``.
    decode: set[int] = field(default_factory=set)

    @property
    def split(self) -> bool:
        """Both prefill and decode workers serve the model: requests are disaggregated."""
        return bool(self.prefill) and bool(self.decode)

    def client_pool(self) -> tuple[str, list[int]]:
        """The pool a request's generating worker comes from (``decode`` while split, else ""
        for every worker that serves clients whole) and the ids of its workers."""
        if self.split:
            return "decode", list(self.decode)
        return "", list(self.instances)


def _same_card(a: ModelCard, b: ModelCard) -> bool:
    """Cards that differ only in role describe the same model (pools of one deployment)."""
    return a == b if a.role == b.role else a == replace(b, role=a.role)


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
            if model is None:
                return
            model.decode.discard(instance.instance_id)
            gone = model.instances.pop(instance.instance_id, None) or model.prefill.pop(
                instance.instance_id, None
            )
            if gone is not None:
                for left in self._on_worker_left:
                    left(instance)
            return
        model = self._models.get(card.model)
        if card.role == "prefill":
            # Prefill workers take no requests from clients: they do not make a model servable,
            # and the card clients are served by stays the one of the workers that serve them.
            if model is None:
                model = self._models[card.model] = ServedModel(card)
            # (An instance that changed role leaves its old pool.)
            model.instances.pop(instance.instance_id, None)
            model.decode.discard(instance.instance_id)
            model.prefill[instance.instance_id] = instance
            return
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
            if not _same_card(model.card, card) and model.instances:
                log.warning("workers of model %s advertise different cards; using the newest", card.model)
            model.card = card
        model.instances[instance.instance_id] = instance
        model.prefill.pop(instance.instance_id, None)
        if card.role == "decode":
            model.decode.add(instance.instance_id)
        else:
            model.decode.discard(instance.instance_id)
        if changed:
            for listener in self._on_model:
                listener(card)
