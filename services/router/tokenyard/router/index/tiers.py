"""Storage tiers and one KV index per tier, queried together."""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from tokenyard.router.index import KvIndex, Prompt, WorkerRank


class Tier(IntEnum):
    """Same numbers as the StorageTier enums of the worker and router contracts."""

    DEVICE = 1
    HOST_PINNED = 2
    DISK = 3
    EXTERNAL = 4


class TieredIndex:
    """The device-tier index plus lower-tier ones, created when a worker first reports that tier."""

    def __init__(self, factory: Callable[[], KvIndex]) -> None:
        self._factory = factory
        self.tiers: dict[Tier, KvIndex] = {Tier.DEVICE: factory()}
        # Called with a rank whose device-tier entries were dropped whole (a cleared event, a
        # snapshot replacing them): what was learned about that cache beside the index is stale.
        self.on_device_cleared: list[Callable[[WorkerRank], None]] = []

    @property
    def device(self) -> KvIndex:
        return self.tiers[Tier.DEVICE]

    def tier(self, tier: Tier) -> KvIndex:
        index = self.tiers.get(tier)
        if index is None:
            index = self.tiers[tier] = self._factory()
        return index

    def find_matches(self, prompt: Prompt) -> dict[Tier, dict[WorkerRank, int]]:
        """Per tier with any blocks, the overlap of each rank holding a prefix of ``prompt``."""
        return {tier: index.find_matches(prompt) for tier, index in self.tiers.items()}

    def clear(self, rank: WorkerRank) -> None:
        for tier in list(self.tiers):
            self.clear_tier(tier, rank)

    def clear_tier(self, tier: Tier, rank: WorkerRank) -> None:
        index = self.tiers.get(tier)
        if index is not None:
            index.clear(rank)
        if tier == Tier.DEVICE:
            for listener in self.on_device_cleared:
                listener(rank)

    def remove_worker(self, worker_id: int) -> None:
        for index in self.tiers.values():
            index.remove_worker(worker_id)

    def num_blocks(self, rank: WorkerRank | None = None) -> int:
        return sum(index.num_blocks(rank) for index in self.tiers.values())
