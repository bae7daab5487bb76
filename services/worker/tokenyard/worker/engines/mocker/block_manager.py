"""Paged KV cache of one data-parallel rank, with prefix caching (vLLM-style).

Block states:

* **free** - holds nothing;
* **private** - held by exactly one sequence and shared with none: a partial (still filling)
  block, or any full block while prefix caching is off or once its prefix is not cached;
* **active** - a full, cached block referenced by at least one sequence (refcounted);
* **inactive** - a full, cached block no sequence references any more; kept for prefix reuse
  and evicted only when a free block is needed;
* **detached** - a block sequences still held when :meth:`KvBlockManager.reset` emptied the
  cache; it is no longer shared with newcomers and is freed when its last holder lets go.

Each cached block is known by its sequence hash, so two sequences with the same prefix share
blocks. Only a block whose parent is cached gets cached, hence *a cached block's parent is
always cached*; with leaves-first eviction this makes the published event stream a valid
sequence of tree edits for a router's radix index (a parent never leaves before its children).

Events (handed to ``sink`` synchronously, in order): ``stored`` for blocks that enter the cache
(never for hits), one event per contiguous run, with the parent hash and the block position of
the run's first block; ``removed`` for inactive blocks actually evicted; ``cleared`` on
:meth:`KvBlockManager.reset`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenyard.worker.kv_events import KvCleared, KvEventData, KvRemoved, KvStored, StoredBlock

KvEventSink = Callable[[KvEventData], object]


@dataclass(slots=True, eq=False)
class KvBlock:
    """A full block that has been in the cache; sequences that hold it share it."""

    seq_hash: int
    local_hash: int
    parent: int | None
    position: int
    refcount: int
    cached: bool = True
    """False once a reset dropped it from the cache; it is then freed when its last holder lets go."""
    children: int = 0
    """Cached blocks whose parent this is; a block with children is not evictable."""
    released_at: int = 0
    """Tick at which the refcount last dropped to zero (LRU order among evictable leaves)."""


class BlockTable:
    """The blocks one sequence holds, in order: full blocks first, then at most one partial block."""

    __slots__ = ("full", "partial")

    def __init__(self) -> None:
        self.full: list[KvBlock | None] = []
        """Each full block: shared (possibly cached) or None for a private one."""
        self.partial = False

    @property
    def num_blocks(self) -> int:
        return len(self.full) + (1 if self.partial else 0)


class KvBlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        sink: KvEventSink | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sink = sink
        self._cached: dict[int, KvBlock] = {}
        self._num_active_cached = 0
        self._num_inactive = 0
        self._num_detached = 0  # held blocks a reset dropped from the cache
        self._num_private = 0
        self._tick = 0
        # Evictable candidates (released_at, seq_hash); stale entries are skipped when popped.
        self._leaves: list[tuple[int, int]] = []

    # -- accounting -------------------------------------------------------------------------

    @property
    def num_active_blocks(self) -> int:
        """Blocks some sequence holds (shared or private)."""
        return self._num_active_cached + self._num_detached + self._num_private

    @property
    def num_inactive_blocks(self) -> int:
        return self._num_inactive

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_active_blocks - self._num_inactive

    def cached_hashes(self) -> set[int]:
        """Sequence hashes of every cached block, active or inactive: what a router should know."""
        return set(self._cached)

    def prefix_hit_blocks(self, seq_hashes: Sequence[int]) -> int:
        """How many leading blocks of a hash chain are cached (active or inactive)."""
        if not self.enable_prefix_caching:
            return 0
        hits = 0
        for h in seq_hashes:
            if h not in self._cached:
                break
            hits += 1
        return hits

    # -- allocation -------------------------------------------------------------------------

    def allocate(
        self, table: BlockTable, num_tokens: int, seq_hashes: Sequence[int], local_hashes: Sequence[int]
    ) -> bool:
        """Make ``table`` cover ``num_tokens`` tokens; all-or-nothing.

        ``seq_hashes``/``local_hashes`` name the sequence's full blocks and must reach at least
        ``num_tokens // block_size`` blocks. Returns False, changing nothing, when even evicting
        every inactive block would not free enough.
        """
        target_full, rest = divmod(num_tokens, self.block_size)
        want_partial = rest > 0
        have_full = len(table.full)
        if target_full < have_full or (target_full == have_full and (table.partial or not want_partial)):
            return True
        if len(seq_hashes) < target_full or len(local_hashes) < target_full:
            raise ValueError(
                f"hashes cover {min(len(seq_hashes), len(local_hashes))} blocks, need {target_full}"
            )

        # Plan each new full block: a hit on a cached block, a store of a new one, or private.
        # A partial block held now is the first new full block; it fills up in place.
        last = table.full[-1] if table.full else None
        parent_cached = self.enable_prefix_caching and (not table.full or (last is not None and last.cached))
        hits: list[KvBlock | None] = []  # per new full block: the cached block it reuses, if any
        frees_partial = False
        need = 1 if want_partial else 0
        reactivate = 0
        for i in range(have_full, target_full):
            first_from_partial = table.partial and i == have_full
            hit = self._cached.get(seq_hashes[i]) if parent_cached else None
            hits.append(hit)
            if hit is not None:
                reactivate += 1 if hit.refcount == 0 else 0
                frees_partial = frees_partial or first_from_partial  # a duplicate: give the partial back
            elif not first_from_partial:
                need += 1
        available = self.num_free_blocks + self._num_inactive - reactivate + (1 if frees_partial else 0)
        if need > available:
            return False

        # Take the hits first and evict afterwards, so eviction never picks a block being reused.
        if frees_partial:
            self._num_private -= 1
        for hit in hits:
            if hit is not None:
                if hit.refcount == 0:
                    self._num_inactive -= 1
                    self._num_active_cached += 1
                hit.refcount += 1
        evicted: list[int] = []
        while self.num_free_blocks < need:
            evicted.append(self._evict_one())
        if evicted:
            self._emit(KvRemoved(tuple(evicted)))

        runs: list[tuple[int | None, int, list[StoredBlock]]] = []
        parent = last.seq_hash if last is not None else None
        for i, hit in zip(range(have_full, target_full), hits, strict=True):
            from_partial = table.partial and i == have_full
            if hit is not None:
                table.full.append(hit)
            elif parent_cached:
                block = KvBlock(seq_hashes[i], local_hashes[i], parent, i, refcount=1)
                self._cached[block.seq_hash] = block
                self._num_active_cached += 1
                if from_partial:
                    self._num_private -= 1
                if parent is not None:
                    self._cached[parent].children += 1
                stored = StoredBlock(block.seq_hash, block.local_hash)
                if runs and runs[-1][2][-1].block_hash == parent:
                    runs[-1][2].append(stored)
                else:
                    runs.append((parent, i, [stored]))
                table.full.append(block)
            else:
                if not from_partial:
                    self._num_private += 1
                table.full.append(None)
            parent = seq_hashes[i]
        if want_partial:
            self._num_private += 1
        table.partial = want_partial
        for run_parent, start, blocks in runs:
            self._emit(KvStored(run_parent, start, tuple(blocks)))
        return True

    def free(self, table: BlockTable) -> None:
        """Give back every block of ``table``; cached ones stay reusable until evicted."""
        # Tail first, so that within one sequence the suffix is the least recently used.
        for block in reversed(table.full):
            if block is None:
                self._num_private -= 1
                continue
            block.refcount -= 1
            if block.refcount > 0:
                continue
            if not block.cached:
                self._num_detached -= 1
                continue
            self._num_active_cached -= 1
            self._num_inactive += 1
            self._tick += 1
            block.released_at = self._tick
            if block.children == 0:
                heapq.heappush(self._leaves, (block.released_at, block.seq_hash))
        if table.partial:
            self._num_private -= 1
        table.full.clear()
        table.partial = False

    def reset(self) -> None:
        """Forget every cached block. Blocks sequences still hold stay theirs until released."""
        for block in self._cached.values():
            block.cached = False
            if block.refcount > 0:
                self._num_detached += 1
        self._num_active_cached = 0
        self._num_inactive = 0
        self._cached.clear()
        self._leaves.clear()
        self._emit(KvCleared())

    def snapshot(self) -> list[KvStored]:
        """``stored`` events that rebuild the current cache from empty, parents before children."""
        runs: list[tuple[int | None, int, list[StoredBlock]]] = []
        open_runs: dict[int, int] = {}  # last block hash of a run -> its index in runs
        for block in sorted(self._cached.values(), key=lambda b: b.position):
            stored = StoredBlock(block.seq_hash, block.local_hash)
            index = open_runs.pop(block.parent, None) if block.parent is not None else None
            if index is None:
                index = len(runs)
                runs.append((block.parent, block.position, [stored]))
            else:
                runs[index][2].append(stored)
            open_runs[block.seq_hash] = index
        return [KvStored(parent, start, tuple(blocks)) for parent, start, blocks in runs]

    # -- internals --------------------------------------------------------------------------

    def _evict_one(self) -> int:
        while self._leaves:
            released_at, h = heapq.heappop(self._leaves)
            block = self._cached.get(h)
            if block is None or block.refcount or block.children or block.released_at != released_at:
                continue
            del self._cached[h]
            block.cached = False
            self._num_inactive -= 1
            if block.parent is not None:
                parent = self._cached[block.parent]
                parent.children -= 1
                if parent.children == 0 and parent.refcount == 0:
                    heapq.heappush(self._leaves, (parent.released_at, parent.seq_hash))
            return h
        raise RuntimeError("KV block accounting is inconsistent: no evictable block")

    def _emit(self, data: KvEventData) -> None:
        if self.sink is not None:
            self.sink(data)
