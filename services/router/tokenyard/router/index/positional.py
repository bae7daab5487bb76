"""Positional KV index: flat integer-keyed maps and per-block rank bitmasks, searched by jumps.

The reference "flash indexer" keys a flat map by ``(position, local hash)`` and, when different
prefixes collide there, disambiguates lazily by sequence hash. Here the key is the router's own
sequence hash of the block (:func:`tokenyard.common.hashing.chain_hash` over the local hashes
from the root), which already names the position and the whole prefix: one int per block, no
collisions to resolve, and queries use the chain the frontend computes anyway. The engine's own
``block_hash`` stays opaque; each rank maps it to the router's key.

Data, all ``int -> int`` dicts (CPython's garbage collector never tracks a dict that holds only
ints, so a million-block index adds nothing to collection pauses):

* ``_mask[key]``: bit ``s`` set iff the rank in slot ``s`` holds the block; the only global
  map, and all the search reads;
* per rank (small maps that stay in cache, where a global one of a million entries does not):
  ``by_hash`` (engine hash -> key), ``by_key`` (key -> engine hash), ``meta`` (key -> local hash
  | position << 64), and the rank's own tree: ``up`` (key -> parent key) and the children of each
  block as a doubly linked list (``first``, ``next``, ``prev``), needed to evict descendants and
  to dump.

Pitfall the design guards against: a removal must take the rank's bit off every descendant too,
otherwise a probe further down would find the bit and count blocks the rank no longer has in
sequence. Removal therefore walks the rank's subtree (engines evict leaves first, so it is
usually one block).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

from tokenyard.common.hashing import XXH3_SEED
from tokenyard.router.index import Chain, InvalidEvent, Prompt, WorkerRank, check_store_args
from tokenyard.router.index.prefix import SlotTable, longest_prefixes

_xxh3 = xxhash.xxh3_64_intdigest
_pack = struct.Struct("<QQ").pack


_U64 = (1 << 64) - 1


class _Rank:
    """One rank's view: its engine hashes and its own tree of blocks, by key."""

    __slots__ = ("by_hash", "by_key", "first", "meta", "next", "prev", "up")

    def __init__(self) -> None:
        self.by_hash: dict[int, int] = {}
        self.by_key: dict[int, int] = {}
        self.meta: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.first: dict[int, int] = {}
        self.next: dict[int, int] = {}
        self.prev: dict[int, int] = {}

    def children(self, key: int) -> list[int]:
        out = []
        child = self.first.get(key)
        nxt = self.next
        while child is not None:
            out.append(child)
            child = nxt.get(child)
        return out


_NOBODY = _Rank()


class PositionalIndex:
    def __init__(self, jump: int = 32) -> None:
        if jump < 1:
            raise ValueError("jump must be at least 1")
        self._jump = jump
        self._mask: dict[int, int] = {}
        self._slots: SlotTable[WorkerRank] = SlotTable()
        self._ranks: list[_Rank] = []

    # -- updates --------------------------------------------------------------------------------

    def store(
        self,
        rank: WorkerRank,
        parent_hash: int | None,
        block_hashes: Sequence[int],
        tokens_hashes: Sequence[int],
        start_position: int | None = None,
    ) -> None:
        check_store_args(block_hashes, tokens_hashes, start_position)
        slot = self._slots.get(rank)
        r = self._ranks[slot] if slot is not None else _NOBODY
        parent: int | None
        if parent_hash is None:
            parent, position = None, 0
        else:
            parent = r.by_hash.get(parent_hash)
            if parent is None:
                raise InvalidEvent(InvalidEvent.UNKNOWN_PARENT, f"parent {parent_hash:#x} is not held")
            position = (r.meta[parent] >> 64) + 1
        if start_position is not None and start_position != position:
            raise InvalidEvent(
                InvalidEvent.BAD_POSITION, f"start position {start_position}, parent depth {position - 1}"
            )
        # Validate the whole event (computing its keys) before changing anything.
        keys: list[int] = []
        key = parent
        xxh3, pack, seed = _xxh3, _pack, XXH3_SEED
        hash_get, key_get = r.by_hash.get, r.by_key.get
        for block_hash, local in zip(block_hashes, tokens_hashes, strict=True):
            key = local if key is None else xxh3(pack(key, local), seed)
            known = hash_get(block_hash)
            if known is not None and known != key:
                raise InvalidEvent(InvalidEvent.CONFLICT, f"{block_hash:#x} names another block")
            held = key_get(key)
            if held is not None and held != block_hash:
                raise InvalidEvent(
                    InvalidEvent.CONFLICT, f"block held as {held:#x}, stored as {block_hash:#x}"
                )
            keys.append(key)
        if not keys:
            return
        if slot is None:
            slot = self._acquire(rank)
            r = self._ranks[slot]
        bit = 1 << slot
        mask = self._mask
        mask_get = mask.get
        by_hash, by_key, meta = r.by_hash, r.by_key, r.meta
        up, first, nxt, prv = r.up, r.first, r.next, r.prev
        for key, block_hash, local in zip(keys, block_hashes, tokens_hashes, strict=True):
            m = mask_get(key, 0)
            if not m & bit:
                mask[key] = m | bit
                meta[key] = local | (position << 64)
                by_hash[block_hash] = key
                by_key[key] = block_hash
                if parent is not None:
                    up[key] = parent
                    sibling = first.get(parent)
                    first[parent] = key
                    if sibling is not None:
                        nxt[key] = sibling
                        prv[sibling] = key
            parent = key
            position += 1

    def _acquire(self, rank: WorkerRank) -> int:
        slot = self._slots.acquire(rank)
        while len(self._ranks) <= slot:
            self._ranks.append(_Rank())
        return slot

    def remove(self, rank: WorkerRank, block_hashes: Sequence[int]) -> int:
        slot = self._slots.get(rank)
        if slot is None:
            return len(block_hashes)
        r = self._ranks[slot]
        by_hash = r.by_hash
        unknown = 0
        for block_hash in block_hashes:
            key = by_hash.get(block_hash)
            if key is None:
                unknown += 1
            elif key in r.first:
                self._drop_subtree(slot, r, key)
            else:
                self._drop(slot, r, key)
        if not by_hash:
            self._release(rank, slot)
        return unknown

    def _drop_subtree(self, slot: int, r: _Rank, key: int) -> None:
        order = [key]
        i = 0
        while i < len(order):
            order.extend(r.children(order[i]))
            i += 1
        # Only the subtree's root leaves a list of siblings that survives; the links inside the
        # subtree go away wholesale.
        self._unlink(r, key)
        up, first, nxt, prv = r.up, r.first, r.next, r.prev
        for k in order[1:]:
            up.pop(k, None)
            first.pop(k, None)
            nxt.pop(k, None)
            prv.pop(k, None)
        first.pop(key, None)
        for k in order:
            self._forget(slot, r, k)

    def _drop(self, slot: int, r: _Rank, key: int) -> None:
        """Take ``key`` (a block the rank holds, without held children) off the rank."""
        self._unlink(r, key)
        self._forget(slot, r, key)

    @staticmethod
    def _unlink(r: _Rank, key: int) -> None:
        """Take ``key`` out of its parent's list of children."""
        parent = r.up.pop(key, None)
        if parent is None:
            return
        nxt, prv = r.next, r.prev
        after = nxt.pop(key, None)
        before = prv.pop(key, None)
        if before is not None:
            if after is not None:
                nxt[before] = after
                prv[after] = before
            else:
                del nxt[before]
        elif after is not None:
            del prv[after]
            r.first[parent] = after
        else:
            del r.first[parent]

    def _forget(self, slot: int, r: _Rank, key: int) -> None:
        del r.by_hash[r.by_key.pop(key)]
        del r.meta[key]
        m = self._mask[key] & ~(1 << slot)
        if m:
            self._mask[key] = m
        else:
            del self._mask[key]

    def _release(self, rank: WorkerRank, slot: int) -> None:
        self._ranks[slot] = _Rank()
        self._slots.release(rank)

    def clear(self, rank: WorkerRank) -> None:
        slot = self._slots.get(rank)
        if slot is None:
            return
        keep = ~(1 << slot)
        mask = self._mask
        for key in self._ranks[slot].by_key:
            m = mask[key] & keep
            if m:
                mask[key] = m
            else:
                del mask[key]
        self._release(rank, slot)

    def remove_worker(self, worker_id: int) -> None:
        for rank in [r for r in self._slots.members() if r.worker_id == worker_id]:
            self.clear(rank)

    # -- queries --------------------------------------------------------------------------------

    def find_matches(self, prompt: Prompt, early_exit: bool = False) -> dict[WorkerRank, int]:
        scores = longest_prefixes(self._mask, prompt.chain, self._jump, early_exit)
        key = self._slots.key
        return {key(slot): score for slot, score in scores.items()}

    def ranks(self) -> list[WorkerRank]:
        return self._slots.members()

    def num_blocks(self, rank: WorkerRank | None = None) -> int:
        if rank is None:
            return sum(len(r.by_key) for r in self._ranks)
        slot = self._slots.get(rank)
        return len(self._ranks[slot].by_key) if slot is not None else 0

    def dump(self, rank: WorkerRank) -> list[Chain]:
        slot = self._slots.get(rank)
        if slot is None:
            return []
        r = self._ranks[slot]
        meta = r.meta
        starts: list[tuple[int, int | None]] = [(k, None) for k in r.by_key if k not in r.up]
        chains: list[Chain] = []
        while starts:
            key, parent_hash = starts.pop()
            chain = Chain(parent_hash)
            chains.append(chain)
            while True:
                block_hash = r.by_key[key]
                chain.block_hashes.append(block_hash)
                chain.tokens_hashes.append(meta[key] & _U64)
                held = r.children(key)
                if not held:
                    break
                key = held[0]
                starts.extend((c, block_hash) for c in held[1:])
        return chains

    def check(self) -> None:
        """Assert the internal invariants (tests): masks, maps and links agree."""
        for slot, r in enumerate(self._ranks):
            bit = 1 << slot
            if not r.by_key:
                continue
            assert self._slots.key(slot) is not None
            for key, h in r.by_key.items():
                assert self._mask[key] & bit and r.by_hash[h] == key
            assert len(r.by_hash) == len(r.by_key) and r.meta.keys() == r.by_key.keys()
            for key, parent in r.up.items():
                assert key in r.by_key and parent in r.by_key, "a rank holds a block without its parent"
                assert key in r.children(parent)
            linked = sum(len(r.children(p)) for p in r.first)
            assert linked == len(r.up) and all(p in r.by_key for p in r.first)
        for key, m in self._mask.items():
            for slot in range(m.bit_length()):
                if m >> slot & 1:
                    assert key in self._ranks[slot].by_key
