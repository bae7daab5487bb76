"""What each worker rank's cache will keep: a shadow of its least-recently-used order.

Engines evict cached blocks nobody holds, least recently released first (the worker contract's
block pool, vLLM, the mocker). A hit emits no KV event, so the index alone cannot tell a prefix
every other request uses from one stored once an hour ago: both are just "held". The router sees
every use, though: a request touches its prompt's blocks when it is routed and again when it ends
(that is when the engine releases them and their LRU clock starts). Replaying those touches into
a per-rank LRU list bounded by the rank's KV capacity forecasts what the engine keeps:

* the oldest entries are what the next allocations on that rank evict;
* an entry touched by two or more requests is *hot* (a shared prefix, a conversation's history);
  one touched once (a request's own suffix) is cheap to lose.

The index's own events correct the forecast where the router cannot see: a rank that is cleared,
replaced by a snapshot, or leaves starts over (:meth:`KeepForecast.forget`).

Keys are the router's sequence hashes (the prompt's chain), as in the positional index. A rank
whose capacity is unknown (0) is not forecast: every question about it answers "no pressure".

Cost: a decision asks every candidate rank what a placement would evict, but changes one rank.
So each rank keeps the answer for its oldest blocks (a running count of hot blocks) until it
changes: a question is then one list lookup, whatever the number of ranks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

from tokenyard.router.index import WorkerRank


class RankForecast:
    """One rank's forecast (see the module's docstring)."""

    __slots__ = ("capacity", "gone", "hot_prefix", "lru", "oldest")

    def __init__(self, capacity: int) -> None:
        # Device KV blocks (the last known), sequence hash -> uses (least recently used first),
        # and what the forecast evicted (about as many as the rank holds, oldest first): what
        # the index may still list until the worker's removal events arrive.
        self.capacity = capacity
        self.lru: OrderedDict[int, int] = OrderedDict()
        self.gone: OrderedDict[int, None] = OrderedDict()
        # hot_prefix[i]: hot blocks among the i oldest, extended on demand from ``oldest`` (an
        # iterator over the uses, oldest first); None until asked after a change.
        self.hot_prefix: list[int] | None = None
        self.oldest: Iterator[int] = iter(())

    def evicted_hot(self, new_blocks: float) -> int:
        """Reused blocks that allocating ``new_blocks`` more here would evict."""
        evicted = int(new_blocks) - (self.capacity - len(self.lru))
        if evicted <= 0:
            return 0
        ready = self.hot_prefix
        if ready is None:
            ready = self.hot_prefix = [0]
            self.oldest = iter(self.lru.values())
        if evicted >= len(ready):
            # Extend the running count as far as this question needs (the rank has not changed
            # since the iterator was made: every change resets hot_prefix).
            last = ready[-1]
            for uses in self.oldest:
                last += uses > 1
                ready.append(last)
                if len(ready) > evicted:
                    break
        return ready[min(evicted, len(ready) - 1)]

    def doomed(self, chain: Sequence[int], length: int | None = None) -> int:
        """Of the first ``length`` (default: all) of ``chain``'s blocks, how many the forecast
        evicted from this rank (work routed here since pushed them out): the index may still
        list them, but they will be gone when this request runs. Blocks the forecast never saw
        (another router's) are not claimed."""
        gone = self.gone
        if not gone:
            return 0
        # Chains are touched leaves first, so evictions take their tails first (as engines do):
        # count from the tail while the blocks are gone.
        end = len(chain) if length is None else min(length, len(chain))
        n = 0
        for i in range(end - 1, -1, -1):
            if chain[i] not in gone:
                break
            n += 1
        return n


class KeepForecast:
    def __init__(self, capacity: Callable[[WorkerRank], int]) -> None:
        # Device KV blocks of a rank (0: unknown), asked when the rank is touched.
        self._capacity = capacity
        # Read by the scheduler for every candidate (RankForecast's questions); changed here only.
        self.ranks: dict[WorkerRank, RankForecast] = {}

    def touch(self, rank: WorkerRank, chain: Sequence[int]) -> None:
        """A request used these blocks on ``rank``: they become the most recent, one use more."""
        capacity = self._capacity(rank)
        if capacity <= 0 or not chain:
            return
        r = self.ranks.get(rank)
        if r is None:
            r = self.ranks[rank] = RankForecast(capacity)
        r.capacity = capacity
        r.hot_prefix = None
        lru, gone = r.lru, r.gone
        get, move = lru.get, lru.move_to_end
        # Leaves first, so that the root ends up the most recent: a chain's tail is evicted
        # before its prefix, as engines evict leaves before their parents.
        for h in reversed(chain):
            uses = get(h)
            if uses is None:
                lru[h] = 1
                gone.pop(h, None)
            else:
                lru[h] = uses + 1
                move(h)
        for _ in range(len(lru) - capacity):
            gone[lru.popitem(last=False)[0]] = None
        # Trimmed as it grows, by what this touch evicted at most: no touch pays for others'.
        for _ in range(len(gone) - capacity):
            gone.popitem(last=False)

    def release(self, rank: WorkerRank, chain: Sequence[int]) -> None:
        """The request that used ``chain`` ended: release order, without counting another use."""
        r = self.ranks.get(rank)
        if r is None:
            return
        r.hot_prefix = None
        lru = r.lru
        move = lru.move_to_end
        for h in reversed(chain):
            if h in lru:
                move(h)

    def free_blocks(self, rank: WorkerRank) -> int | None:
        """Blocks ``rank`` can allocate without evicting anything (None: not forecast)."""
        r = self.ranks.get(rank)
        if r is None:
            capacity = self._capacity(rank)
            return capacity if capacity > 0 else None
        return r.capacity - len(r.lru)

    def evicted_hot(self, rank: WorkerRank, new_blocks: float) -> int:
        """Reused blocks that allocating ``new_blocks`` more on ``rank`` would evict."""
        r = self.ranks.get(rank)
        return r.evicted_hot(new_blocks) if r is not None else 0

    def doomed(self, rank: WorkerRank, chain: Sequence[int]) -> int:
        """See :meth:`RankForecast.doomed`."""
        r = self.ranks.get(rank)
        return r.doomed(chain) if r is not None else 0

    def forget(self, rank: WorkerRank) -> None:
        self.ranks.pop(rank, None)

    def forget_worker(self, worker_id: int) -> None:
        for rank in [r for r in self.ranks if r.worker_id == worker_id]:
            del self.ranks[rank]

    def blocks(self, rank: WorkerRank) -> int:
        r = self.ranks.get(rank)
        return len(r.lru) if r is not None else 0
