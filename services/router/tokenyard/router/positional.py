"""Positional KV index: flat integer-keyed maps and per-block rank bitmasks, searched by jumps.

The reference "flash indexer" keys a flat map by ``(position, local hash)`` and, when different
prefixes collide there, disambiguates lazily by sequence hash. Here the key is the router's own
sequence hash of the block (:func:`tokenyard.common.hashing.chain_hash` over the local hashes
from the root), which already names the position and the whole prefix: one int per block, no
collisions to resolve, and queries use the chain the frontend computes anyway. The engine's own
``block_hash`` stays opaque; each rank maps it to the router's key.

Data, all keyed by ints:

* ``_mask[key]``: bit ``s`` set iff the rank in slot ``s`` holds the block (the search reads
  only this map);
* ``_node[key] = (parent key, local hash, position)``, and ``_children[key]``: the tree shape,
  needed to evict descendants and to dump;
* per slot, ``_by_hash[s]: engine hash -> key`` and ``_by_key[s]: key -> engine hash``.

Pitfall the design guards against: a removal must take the rank's bit off every descendant too,
otherwise a probe further down would find the bit and count blocks the rank no longer has in
sequence. Removal therefore walks the subtree (engines evict leaves first, so it is usually one
block).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

from tokenyard.common.hashing import XXH3_SEED
from tokenyard.router.index import Chain, InvalidEvent, Prompt, WorkerRank, check_store_args
from tokenyard.router.prefix import SlotTable, longest_prefixes

_xxh3 = xxhash.xxh3_64_intdigest
_pack = struct.Struct("<QQ").pack


class PositionalIndex:
    def __init__(self, jump: int = 32) -> None:
        if jump < 1:
            raise ValueError("jump must be at least 1")
        self._jump = jump
        self._mask: dict[int, int] = {}
        self._node: dict[int, tuple[int | None, int, int]] = {}
        self._children: dict[int, list[int]] = {}
        self._slots: SlotTable[WorkerRank] = SlotTable()
        self._by_hash: list[dict[int, int]] = []
        self._by_key: list[dict[int, int]] = []

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
        by_hash = self._by_hash[slot] if slot is not None else {}
        by_key = self._by_key[slot] if slot is not None else {}
        parent: int | None
        if parent_hash is None:
            parent, position = None, 0
        else:
            parent = by_hash.get(parent_hash)
            if parent is None:
                raise InvalidEvent(InvalidEvent.UNKNOWN_PARENT, f"parent {parent_hash:#x} is not held")
            position = self._node[parent][2] + 1
        if start_position is not None and start_position != position:
            raise InvalidEvent(
                InvalidEvent.BAD_POSITION, f"start position {start_position}, parent depth {position - 1}"
            )
        # Validate the whole event (computing its keys) before changing anything.
        keys: list[int] = []
        key = parent
        xxh3, seed = _xxh3, XXH3_SEED
        for block_hash, local in zip(block_hashes, tokens_hashes, strict=True):
            key = local if key is None else xxh3(_pack(key, local), seed)
            known = by_hash.get(block_hash)
            if known is not None and known != key:
                raise InvalidEvent(InvalidEvent.CONFLICT, f"{block_hash:#x} names another block")
            held = by_key.get(key)
            if held is not None and held != block_hash:
                raise InvalidEvent(
                    InvalidEvent.CONFLICT, f"block held as {held:#x}, stored as {block_hash:#x}"
                )
            keys.append(key)
        if not keys:
            return
        if slot is None:
            slot = self._acquire(rank)
            by_hash, by_key = self._by_hash[slot], self._by_key[slot]
        bit = 1 << slot
        mask, node, children = self._mask, self._node, self._children
        for key, block_hash, local in zip(keys, block_hashes, tokens_hashes, strict=True):
            m = mask.get(key, 0)
            if not m:
                node[key] = (parent, local, position)
                if parent is not None:
                    kids = children.get(parent)
                    if kids is None:
                        children[parent] = [key]
                    else:
                        kids.append(key)
            if not m & bit:
                mask[key] = m | bit
                by_hash[block_hash] = key
                by_key[key] = block_hash
            parent = key
            position += 1

    def _acquire(self, rank: WorkerRank) -> int:
        slot = self._slots.acquire(rank)
        while len(self._by_hash) <= slot:
            self._by_hash.append({})
            self._by_key.append({})
        return slot

    def remove(self, rank: WorkerRank, block_hashes: Sequence[int]) -> int:
        slot = self._slots.get(rank)
        if slot is None:
            return len(block_hashes)
        by_hash = self._by_hash[slot]
        unknown = 0
        for block_hash in block_hashes:
            key = by_hash.get(block_hash)
            if key is None:
                unknown += 1
            else:
                self._drop(slot, key)
        if not by_hash:
            self._slots.release(rank)
        return unknown

    def _drop(self, slot: int, key: int) -> None:
        bit = 1 << slot
        by_hash, by_key = self._by_hash[slot], self._by_key[slot]
        mask, children = self._mask, self._children
        stack = [key]
        while stack:
            k = stack.pop()
            m = mask.get(k, 0)
            if not m & bit:
                continue
            del by_hash[by_key.pop(k)]
            kids = children.get(k)
            if kids:
                stack.extend(c for c in kids if mask.get(c, 0) & bit)
            m ^= bit
            if m:
                mask[k] = m
            else:
                self._delete_node(k)

    def _delete_node(self, key: int) -> None:
        # Only called once no rank holds the block; by prefix closure its subtree is empty too.
        del self._mask[key]
        parent = self._node.pop(key)[0]
        self._children.pop(key, None)
        if parent is not None:
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.remove(key)
                if not siblings:
                    del self._children[parent]

    def clear(self, rank: WorkerRank) -> None:
        slot = self._slots.get(rank)
        if slot is None:
            return
        keep = ~(1 << slot)
        mask = self._mask
        for key in self._by_key[slot]:
            m = mask[key] & keep
            if m:
                mask[key] = m
            else:
                self._delete_node(key)
        self._by_hash[slot] = {}
        self._by_key[slot] = {}
        self._slots.release(rank)

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
            return sum(len(m) for m in self._by_key)
        slot = self._slots.get(rank)
        return len(self._by_key[slot]) if slot is not None else 0

    def dump(self, rank: WorkerRank) -> list[Chain]:
        slot = self._slots.get(rank)
        if slot is None:
            return []
        bit = 1 << slot
        by_key, mask, node, children = self._by_key[slot], self._mask, self._node, self._children
        starts: list[tuple[int, int | None]] = [(k, None) for k in by_key if node[k][0] is None]
        chains: list[Chain] = []
        while starts:
            key, parent_hash = starts.pop()
            chain = Chain(parent_hash)
            chains.append(chain)
            while True:
                block_hash = by_key[key]
                chain.block_hashes.append(block_hash)
                chain.tokens_hashes.append(node[key][1])
                held = [c for c in children.get(key, ()) if mask[c] & bit]
                if not held:
                    break
                key = held[0]
                starts.extend((c, block_hash) for c in held[1:])
        return chains
