"""The workers the router may choose from: discovery records, what each one told about itself
(ranks, KV pool, batch budget), and the load it last reported per rank."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenyard.common.discovery import Discovery, DiscoveryError, Instance, WatchEventKind
from tokenyard.router.index import WorkerRank

log = logging.getLogger(__name__)

POOL_ROLES: dict[str, tuple[str, ...]] = {
    # Clients of the aggregated pool never get a prefill-only worker.
    "": ("aggregated", "decode"),
    "aggregated": ("aggregated",),
    "prefill": ("prefill",),
    "decode": ("decode",),
}


@dataclass(frozen=True, slots=True)
class LoadReport:
    """One rank's load as the worker measured it."""

    dp_rank: int
    active_blocks: int
    total_blocks: int
    waiting_requests: int
    running_requests: int
    active_prefill_tokens: int
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class WorkerDetails:
    """What a worker says about itself (WorkerService.Describe)."""

    dp_size: int = 1
    total_kv_blocks: int = 0
    max_num_batched_tokens: int = 0
    publishes_kv_events: bool = True


@dataclass(slots=True)
class WorkerState:
    instance: Instance
    details: WorkerDetails | None = None
    loads: dict[int, LoadReport] = field(default_factory=dict)
    # With mTLS, set once a call to the worker passed the handshake with a worker certificate:
    # until then its discovery record is a claim, and it gets no requests.
    proven: bool = False
    # rank_keys()'s answer, kept while dp_size stays the same (every decision asks for it).
    _rank_keys: tuple[WorkerRank, ...] = field(default=(), init=False, repr=False, compare=False)

    @property
    def worker_id(self) -> int:
        return self.instance.instance_id

    def rank_keys(self) -> tuple[WorkerRank, ...]:
        """``WorkerRank`` of each of the worker's data-parallel ranks, in order."""
        keys, size = self._rank_keys, self.dp_size
        if len(keys) != size:  # the id never changes: a WorkerState is kept per instance id
            keys = self._rank_keys = tuple(WorkerRank(self.instance.instance_id, r) for r in range(size))
        return keys

    @property
    def dp_size(self) -> int:
        # Until described, rank 0 (every worker has it); reported loads reveal more ranks.
        if self.details is not None:
            return self.details.dp_size
        return max(1, *(r + 1 for r in self.loads)) if self.loads else 1

    @property
    def block_size(self) -> int:
        card = self.instance.model_card
        return card.block_size if card is not None else 0

    @property
    def role(self) -> str:
        """aggregated, prefill or decode (the pool the worker belongs to)."""
        card = self.instance.model_card
        return card.role if card is not None else "aggregated"

    @property
    def total_kv_blocks(self) -> int:
        if self.details is not None and self.details.total_kv_blocks:
            return self.details.total_kv_blocks
        card = self.instance.model_card
        return card.total_kv_blocks if card is not None else 0


class WorkerSet:
    """``instance id -> WorkerState`` of every registered worker, in registration order."""

    def __init__(self, require_proof: bool = False) -> None:
        self._require_proof = require_proof
        self._workers: dict[int, WorkerState] = {}
        self._listeners: list[Callable[[WatchEventKind, Instance], None]] = []

    def on_change(self, listener: Callable[[WatchEventKind, Instance], None]) -> None:
        self._listeners.append(listener)

    def apply(self, kind: WatchEventKind, instance: Instance) -> None:
        if kind is WatchEventKind.REMOVED:
            if self._workers.pop(instance.instance_id, None) is None:
                return
            log.info("worker %d at %s left", instance.instance_id, instance.address)
        else:
            state = self._workers.get(instance.instance_id)
            if state is None:
                log.info("worker %d at %s joined", instance.instance_id, instance.address)
                self._workers[instance.instance_id] = WorkerState(instance)
            else:
                if state.instance.address != instance.address:
                    # A new address has to prove itself again.
                    state.proven = False
                state.instance = instance
        for listener in self._listeners:
            listener(kind, instance)

    def get(self, instance_id: int) -> WorkerState | None:
        return self._workers.get(instance_id)

    def all(self) -> list[WorkerState]:
        return list(self._workers.values())

    def for_model(self, model: str, pool: str = "") -> list[WorkerState]:
        """Workers serving ``model`` in ``pool`` ("" = what clients are served by)."""
        roles = POOL_ROLES[pool]
        return [
            w
            for w in self._usable()
            if (card := w.instance.model_card) is not None and card.model == model and card.role in roles
        ]

    def serves(self, model: str) -> bool:
        return any(
            (card := w.instance.model_card) is not None and card.model == model for w in self._usable()
        )

    def _usable(self) -> list[WorkerState]:
        if not self._require_proof:
            return list(self._workers.values())
        return [w for w in self._workers.values() if w.proven]

    def __len__(self) -> int:
        return len(self._workers)


class WorkerWatch:
    """Feeds a :class:`WorkerSet` from discovery until closed; survives discovery outages."""

    def __init__(self, discovery: Discovery, workers: WorkerSet) -> None:
        self._discovery = discovery
        self._workers = workers
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="worker-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async for event in self._discovery.watch("worker"):
                    self._workers.apply(event.kind, event.instance)
            except DiscoveryError as exc:
                log.warning("worker watch failed, retrying in 1s: %s", exc)
                await asyncio.sleep(1.0)
                await self._forget_departed()

    async def _forget_departed(self) -> None:
        # A new watch replays what is registered, not what left during the outage.
        try:
            live = {i.instance_id for i in await self._discovery.instances("worker")}
        except DiscoveryError:
            return
        for state in self._workers.all():
            if state.worker_id not in live:
                self._workers.apply(WatchEventKind.REMOVED, state.instance)
