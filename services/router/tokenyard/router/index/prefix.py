"""Longest-prefix search over ``sequence hash -> bitmask of ranks`` maps, with jump search.

Both the positional KV index and the active-block tracker keep, per sequence hash, an ``int``
whose bit ``s`` says that the rank in slot ``s`` holds the block. A sequence hash names a block
together with its whole prefix, and each rank's set is prefix-closed (holding block k implies
holding blocks 0..k-1 of that prefix), so a rank's overlap with a prompt is the first position
where its bit is missing, and presence at a probe proves presence everywhere before it. The
search probes every ``jump`` positions and scans only the intervals where some rank dropped out.

Bitmasks keep the hot loop to one dict lookup and one ``&`` per visited position, whatever the
number of ranks, without allocating per position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

K = TypeVar("K")


def bits(mask: int) -> Iterator[int]:
    """The positions of the set bits of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def longest_prefixes(
    masks: dict[int, int], keys: Sequence[int], jump: int, early_exit: bool = False
) -> dict[int, int]:
    """``slot -> number of leading keys present`` for every slot present at ``keys[0]``.

    With ``early_exit`` the search stops at the first position where a single slot is left, which
    then scores that position + 1 (what a position-by-position walk stopping there reports).
    """
    n = len(keys)
    if n == 0:
        return {}
    get = masks.get
    candidates = get(keys[0], 0)
    if not candidates:
        return {}
    scores: dict[int, int] = {}
    if early_exit and candidates & (candidates - 1) == 0:
        scores[candidates.bit_length() - 1] = 1
        return scores
    lo = 0
    last = n - 1
    while lo < last:
        hi = lo + jump
        if hi > last:
            hi = last
        present = get(keys[hi], 0) & candidates
        if present != candidates:
            # Some slots left within (lo, hi]: walk it to find where each one first went missing
            # (``alive`` shrinks to ``present``, which is present all along the interval).
            alive = candidates
            p = lo + 1
            while alive != present:
                now = alive & get(keys[p], 0)
                if now != alive:
                    for slot in bits(alive ^ now):
                        scores[slot] = p
                    alive = now
                    if not alive:
                        return scores
                    if early_exit and alive & (alive - 1) == 0:
                        scores[alive.bit_length() - 1] = p + 1
                        return scores
                p += 1
            candidates = present
        lo = hi
    for slot in bits(candidates):
        scores[slot] = n
    return scores


class SlotTable(Generic[K]):
    """Small integers for keys (bit positions in the masks), reusing the lowest free one."""

    def __init__(self) -> None:
        self._slots: dict[K, int] = {}
        self._keys: list[K | None] = []
        self._free: list[int] = []

    def get(self, key: K) -> int | None:
        return self._slots.get(key)

    def acquire(self, key: K) -> int:
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        if self._free:
            self._free.sort(reverse=True)
            slot = self._free.pop()
            self._keys[slot] = key
        else:
            slot = len(self._keys)
            self._keys.append(key)
        self._slots[key] = slot
        return slot

    def release(self, key: K) -> int | None:
        """Free ``key``'s slot; the caller must have cleared its bit everywhere first."""
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._keys[slot] = None
            self._free.append(slot)
        return slot

    def key(self, slot: int) -> K:
        key = self._keys[slot]
        assert key is not None, f"slot {slot} is free"
        return key

    def members(self) -> list[K]:
        return list(self._slots)

    def __len__(self) -> int:
        return len(self._slots)
