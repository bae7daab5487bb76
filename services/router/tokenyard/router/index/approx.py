"""The router's own routing decisions as a KV index, for a while.

Two uses: approximate mode (engines that publish no KV events: the decisions are the index) and
predict-on-route (a short-lived side index consulted next to the real one, so that requests
sharing a prefix that arrive before the worker reported it still find it).

Each routed prompt's blocks are stored in the index for the chosen rank, as if the worker had
reported them, and forgotten ``ttl`` seconds after their last use; when more than ``max_blocks``
are recorded, the least recently used are evicted down to ``prune_ratio * max_blocks``. A prompt
touches all of its blocks, parents first, so a parent is never older than its children and an
eviction (which takes descendants along) never drops a fresher block.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from tokenyard.router.index import KvIndex, Prompt, WorkerRank


class ApproximateRecorder:
    def __init__(
        self,
        index: KvIndex,
        *,
        ttl: float = 120.0,
        max_blocks: int = 1 << 20,
        prune_ratio: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_blocks < 1 or not 0 < prune_ratio <= 1:
            raise ValueError("ttl and max_blocks must be positive, prune_ratio in (0, 1]")
        self._index = index
        self._ttl = ttl
        self._max = max_blocks
        self._target = max(1, int(max_blocks * prune_ratio))
        self._clock = clock
        # (rank, sequence hash) -> expiry, least recently touched first
        self._touched: OrderedDict[tuple[WorkerRank, int], float] = OrderedDict()

    @property
    def index(self) -> KvIndex:
        return self._index

    def record(self, rank: WorkerRank, prompt: Prompt) -> None:
        """The router sent ``prompt`` to ``rank``: it will hold the prompt's blocks for a while."""
        if not len(prompt):
            return
        chain = prompt.chain
        # The router's own sequence hashes serve as block hashes; the whole chain from the root
        # re-stores idempotently what the rank already holds.
        self._index.store(rank, None, list(chain), list(prompt.local), 0)
        expiry = self._clock() + self._ttl
        touched = self._touched
        for h in chain:
            key = (rank, h)
            touched[key] = expiry
            touched.move_to_end(key)
        if len(touched) > self._max:
            self._evict(len(touched) - self._target)

    def expire(self) -> int:
        """Forget blocks past their TTL; returns how many entries were dropped."""
        now = self._clock()
        count = 0
        touched = self._touched
        while touched:
            key, expiry = next(iter(touched.items()))
            if expiry > now:
                break
            self._forget(key)
            count += 1
        return count

    def _evict(self, count: int) -> None:
        for _ in range(min(count, len(self._touched))):
            self._forget(next(iter(self._touched)))

    def _forget(self, key: tuple[WorkerRank, int]) -> None:
        del self._touched[key]
        # Unknown when an ancestor's eviction already took it: nothing to do then.
        self._index.remove(key[0], [key[1]])

    def remove_worker(self, worker_id: int) -> None:
        for key in [k for k in self._touched if k[0].worker_id == worker_id]:
            del self._touched[key]

    def __len__(self) -> int:
        return len(self._touched)
