"""The paged KV block pool of one rank, with prefix caching by sequence hash (vLLM-style).

The one block pool of the engines Tokenyard schedules itself: the simulated engine uses it for its
accounting and events, the CPU engine also for where K and V live (a block id is an index into its
KV tensors, :mod:`tokenyard.worker.engines.cpu.kv_storage`). Which blocks a sequence uses is its
:class:`BlockTable`.

A block is *cached* (gets its sequence hash, is announced with ``stored``, and can be shared) only
once its tokens have been computed, in :meth:`BlockPool.commit`, never when it is allocated. A
request therefore never finds a block whose K and V are still to be written, and a cached block is
never written again. The states:

* **free** - holds nothing (a never-used block, or one evicted or given back);
* **private** - held by one sequence only: filling up, or full but not cached (its prefix is not
  cached, or another block already holds its hash: a duplicate);
* **active** - cached, held by at least one sequence (refcounted);
* **inactive** - cached, held by none; kept for reuse and evicted least recently used first;
* **detached** - held when :meth:`BlockPool.reset` emptied the cache; freed when let go.

Only a block whose parent hash is cached gets cached, and a block with cached children is never
evicted (leaves first), so the ``stored``/``removed``/``cleared`` stream is always a valid series
of tree edits for a router's radix index: a parent never leaves before its children.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tokenyard.worker.kv_events import KvCleared, KvEventData, KvRemoved, KvStored, StoredBlock

KvEventSink = Callable[[KvEventData], object]


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    """Index into the pools; fixed for the life of the cache."""
    refcount: int = 0
    seq_hash: int | None = None
    """Set while the block is cached (and only then)."""
    local_hash: int = 0
    parent_hash: int | None = None
    position: int = 0
    """Block index within its sequence."""
    children: int = 0
    """Cached blocks whose parent this is; a block with children is not evictable."""
    released_at: int = 0
    """Tick at which the refcount last dropped to zero (LRU order among evictable leaves)."""


class BlockTable:
    """The blocks one sequence uses, in order; the first ``num_committed`` hold final contents."""

    __slots__ = ("blocks", "num_committed")

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.num_committed = 0

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


class BlockPool:
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
        self._blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks are taken from the end; reversed so that block 0 goes first (easier to read in tests).
        self._free: list[Block] = list(reversed(self._blocks))
        self._cached: dict[int, Block] = {}
        self._num_inactive = 0
        self._tick = 0
        # Evictable candidates (released_at, block_id); stale entries are skipped when popped.
        self._leaves: list[tuple[int, int]] = []

    # -- accounting -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones, plus inactive cached ones it may evict."""
        return len(self._free) + self._num_inactive

    @property
    def num_active_blocks(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - len(self._free) - self._num_inactive

    @property
    def num_inactive_blocks(self) -> int:
        return self._num_inactive

    def cached_hashes(self) -> set[int]:
        """Sequence hashes of every cached block, active or inactive: what a router should know."""
        return set(self._cached)

    def cached_block(self, seq_hash: int) -> Block | None:
        return self._cached.get(seq_hash)

    def match_prefix(self, seq_hashes: Iterable[int]) -> list[Block]:
        """The cached blocks of a hash chain's longest cached prefix (no reference taken)."""
        if not self.enable_prefix_caching:
            return []
        found: list[Block] = []
        for h in seq_hashes:
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    # -- allocation -------------------------------------------------------------------------

    def allocate(self, table: BlockTable, num_tokens: int, prefix: Sequence[Block] = ()) -> bool:
        """Make ``table`` hold enough blocks for ``num_tokens`` tokens; all or nothing.

        ``prefix`` (only for an empty table) are cached blocks from :meth:`match_prefix` that the
        table starts with, shared and already computed. Returns False, changing nothing but maybe
        evicting inactive blocks, when the pool cannot supply the rest.
        """
        if prefix and table.blocks:
            raise ValueError("a prefix can only start an empty block table")
        need = -(-num_tokens // self.block_size) - len(table.blocks) - len(prefix)
        for block in prefix:
            self._ref(block)
        if need <= 0:
            self._adopt(table, prefix, [])
            return True
        if need > self.num_free_blocks:
            self._unref_all(prefix)
            return False
        fresh: list[Block] = []
        evicted: list[int] = []
        try:
            while len(fresh) < need:
                if self._free:
                    fresh.append(self._free.pop())
                    continue
                victim = self._evict_one()
                if victim is None:  # inactive blocks pinned by active children: not enough after all
                    self._free.extend(reversed(fresh))
                    self._unref_all(prefix)
                    return False
                evicted.append(victim[0])
                fresh.append(victim[1])
        finally:
            if evicted:
                self._emit(KvRemoved(tuple(evicted)))
        for block in fresh:
            block.refcount = 1
        self._adopt(table, prefix, fresh)
        return True

    def _adopt(self, table: BlockTable, prefix: Sequence[Block], fresh: list[Block]) -> None:
        if prefix:
            table.blocks.extend(prefix)
            table.num_committed = len(prefix)
        table.blocks.extend(fresh)

    def commit(
        self, table: BlockTable, num_computed: int, seq_hashes: Sequence[int], local_hashes: Sequence[int]
    ) -> None:
        """Record that the first ``num_computed`` tokens of the table's sequence are in the pools:
        each newly completed block is cached (and announced) unless its prefix is not cached or
        its hash already is. ``seq_hashes``/``local_hashes`` must cover the completed blocks."""
        full = min(num_computed // self.block_size, len(table.blocks))
        if full <= table.num_committed:
            return
        if len(seq_hashes) < full or len(local_hashes) < full:
            raise ValueError(f"hashes cover {min(len(seq_hashes), len(local_hashes))} blocks, need {full}")
        runs: list[tuple[int | None, int, list[StoredBlock]]] = []
        for i in range(table.num_committed, full):
            block = table.blocks[i]
            h = seq_hashes[i]
            parent = seq_hashes[i - 1] if i > 0 else None
            if (
                not self.enable_prefix_caching
                or h in self._cached
                or (parent is not None and parent not in self._cached)
            ):
                continue
            block.seq_hash = h
            block.local_hash = local_hashes[i]
            block.parent_hash = parent
            block.position = i
            block.children = 0
            self._cached[h] = block
            if parent is not None:
                self._cached[parent].children += 1
            stored = StoredBlock(h, block.local_hash)
            if runs and runs[-1][2][-1].block_hash == parent:
                runs[-1][2].append(stored)
            else:
                runs.append((parent, i, [stored]))
        table.num_committed = full
        for run_parent, start, blocks in runs:
            self._emit(KvStored(run_parent, start, tuple(blocks)))

    def release(self, table: BlockTable) -> None:
        """Give back every block of ``table``; cached ones stay reusable until evicted."""
        # Tail first, so that within one sequence the suffix is the least recently used.
        for block in reversed(table.blocks):
            self._unref(block)
        table.blocks.clear()
        table.num_committed = 0

    def reset(self) -> None:
        """Forget every cached block. Blocks sequences still hold stay theirs until released."""
        for block in self._cached.values():
            block.seq_hash = None
            block.children = 0
            if block.refcount == 0:
                self._free.append(block)
        self._cached.clear()
        self._leaves.clear()
        self._num_inactive = 0
        self._emit(KvCleared())

    def snapshot(self) -> list[KvStored]:
        """``stored`` events that rebuild the current cache from empty, parents before children."""
        runs: list[tuple[int | None, int, list[StoredBlock]]] = []
        open_runs: dict[int, int] = {}  # last block hash of a run -> its index in runs
        for block in sorted(self._cached.values(), key=lambda b: b.position):
            assert block.seq_hash is not None
            stored = StoredBlock(block.seq_hash, block.local_hash)
            index = open_runs.pop(block.parent_hash, None) if block.parent_hash is not None else None
            if index is None:
                index = len(runs)
                runs.append((block.parent_hash, block.position, [stored]))
            else:
                runs[index][2].append(stored)
            open_runs[block.seq_hash] = index
        return [KvStored(parent, start, tuple(blocks)) for parent, start, blocks in runs]

    # -- imported KV ------------------------------------------------------------------------

    def import_blocks(
        self,
        table: BlockTable,
        seq_hashes: Sequence[int],
        local_hashes: Sequence[int],
        fill: Callable[[Block, int], None],
    ) -> bool:
        """Fill the empty ``table`` with a sequence's first ``len(seq_hashes)`` blocks whose KV
        was computed elsewhere: cached ones are shared, ``fill(block, i)`` writes each other one
        (the i-th of the sequence) before it is committed. All or nothing: False when the pool
        cannot hold them."""
        if table.blocks:
            raise ValueError("blocks can only be imported into an empty block table")
        prefix = self.match_prefix(seq_hashes)
        if not self.allocate(table, len(seq_hashes) * self.block_size, prefix):
            return False
        for i in range(len(prefix), len(seq_hashes)):
            fill(table.blocks[i], i)
        self.commit(table, len(seq_hashes) * self.block_size, seq_hashes, local_hashes)
        return True

    # -- internals --------------------------------------------------------------------------

    def _ref(self, block: Block) -> None:
        if block.refcount == 0:
            self._num_inactive -= 1
        block.refcount += 1

    def _unref(self, block: Block) -> None:
        block.refcount -= 1
        if block.refcount > 0:
            return
        if block.seq_hash is not None and self._cached.get(block.seq_hash) is block:
            self._num_inactive += 1
            self._tick += 1
            block.released_at = self._tick
            if block.children == 0:
                heapq.heappush(self._leaves, (block.released_at, block.block_id))
            return
        block.seq_hash = None
        self._free.append(block)

    def _unref_all(self, blocks: Iterable[Block]) -> None:
        for block in reversed(list(blocks)):
            self._unref(block)

    def _evict_one(self) -> tuple[int, Block] | None:
        """Evict the least recently released cached leaf: ``(its hash, the block)``, None if none."""
        while self._leaves:
            released_at, block_id = heapq.heappop(self._leaves)
            block = self._blocks[block_id]
            h = block.seq_hash
            if (
                h is None
                or self._cached.get(h) is not block
                or block.refcount
                or block.children
                or block.released_at != released_at
            ):
                continue
            del self._cached[h]
            block.seq_hash = None
            self._num_inactive -= 1
            if block.parent_hash is not None:
                parent = self._cached[block.parent_hash]
                parent.children -= 1
                if parent.children == 0 and parent.refcount == 0:
                    heapq.heappush(self._leaves, (parent.released_at, parent.block_id))
            return h, block
        return None

    def _emit(self, data: KvEventData) -> None:
        if self.sink is not None:
            self.sink(data)
