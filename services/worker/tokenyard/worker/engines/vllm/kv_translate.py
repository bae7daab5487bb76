"""vLLM's KV cache events, translated into Tokenyard's (``stored`` / ``removed`` / ``cleared``).

vLLM names a block by its own hash (SHA-256 over the prefix, with its own salts); routers and
frontends name it by Tokenyard's (XXH3, :mod:`tokenyard.common.hashing`). vLLM's ``BlockStored``
carries the token ids of the blocks it stores, so each block's local and sequence hash are
recomputed here, and a map from vLLM's hash to ours answers later ``BlockRemoved`` events and
parents of later chains.

Two differences between vLLM's cache and the index a router keeps are bridged here:

* **Copies.** vLLM may hold one hash in several physical blocks (two requests that computed the
  same prefix in the same step; a prompt whose last full block is recomputed because the last
  token must be). Each copy is stored and removed with its own event, while a router holds the
  block once: a block is published as stored when its first copy arrives and as removed when its
  last copy leaves.
* **Prefix closure.** A router drops a removed block's descendants with it. vLLM evicts least
  recently used blocks first and a request frees its tail before its head, so a parent normally
  outlives its children; when it does not, the children cannot be hit in vLLM either (its prefix
  matching stops at the missing parent). They are dropped here too and remembered as *orphans*, so
  that their later removal (or a new copy of them) is counted right.

The translator is plain Python over duck-typed event objects (vLLM's ``BlockStored``,
``BlockRemoved`` and ``AllBlocksCleared``, told apart by class name), so it runs without vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenyard.common.hashing import local_block_hashes, salt_hash, sequence_hashes
from tokenyard.worker.kv_events import KvCleared, KvEventData, KvRemoved, KvStored, StoredBlock

log = logging.getLogger(__name__)

# vLLM's name for the pool its engine computes into; offloading tiers (CPU, storage) publish their
# own media, which are not this engine's cache.
DEVICE_MEDIA = frozenset({None, "GPU"})

VllmHash = Hashable
"""vLLM's external block hash: an int or bytes, depending on its hash function."""


@dataclass(slots=True)
class _Block:
    seq_hash: int
    local_hash: int
    parent: VllmHash | None
    position: int
    seed: int
    """Local-hash seed of the chain (LoRA and cache salt), inherited by children."""
    copies: int = 1
    children: set[VllmHash] = field(default_factory=set)


@dataclass(slots=True)
class TranslatorStats:
    stored_blocks: int = 0
    removed_blocks: int = 0
    duplicate_copies: int = 0
    orphaned_blocks: int = 0
    unknown_parents: int = 0
    skipped_events: int = 0


class KvEventTranslator:
    """Applies vLLM's events in order and publishes the Tokenyard events they amount to."""

    def __init__(self, block_size: int, publish: Callable[[KvEventData], object]) -> None:
        self.block_size = block_size
        self._publish = publish
        # Insertion order is a valid parents-before-children order: a block enters only under a
        # parent that is present, and leaves together with all of its descendants.
        self._blocks: dict[VllmHash, _Block] = {}
        self._orphans: dict[VllmHash, int] = {}
        """vLLM hashes dropped with an evicted ancestor that vLLM still holds: copies left."""
        self.stats = TranslatorStats()

    # -- events -----------------------------------------------------------------------------

    def apply(self, events: Iterable[Any]) -> None:
        for event in events:
            kind = type(event).__name__
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                self._removed(event)
            elif kind == "AllBlocksCleared":
                self._cleared()
            else:
                self.stats.skipped_events += 1
                log.debug("ignoring a vLLM KV event of kind %s", kind)

    def _stored(self, event: Any) -> None:
        if getattr(event, "medium", None) not in DEVICE_MEDIA:
            return
        hashes = list(event.block_hashes)
        tokens = list(event.token_ids)
        size = int(event.block_size)
        if size != self.block_size or len(tokens) != len(hashes) * size:
            self.stats.skipped_events += 1
            log.warning(
                "ignoring a vLLM stored event of %d blocks, %d tokens, block size %d (expected %d)",
                len(hashes),
                len(tokens),
                size,
                self.block_size,
            )
            return
        parent_key = event.parent_block_hash
        if parent_key is None:
            seed = salt_hash(getattr(event, "lora_name", None), _root_salt(event))
            position = 0
            our_parent: int | None = None
        else:
            parent = self._blocks.get(parent_key)
            if parent is None:
                # The parent of a new chain belongs to the request that stores it, so it is held
                # and was announced; only a lost event gets here.
                self.stats.unknown_parents += 1
                log.warning("vLLM stored %d blocks under a parent it never announced; ignored", len(hashes))
                return
            seed = parent.seed
            position = parent.position + 1
            our_parent = parent.seq_hash
        local = local_block_hashes(tokens, size, seed)
        chained = sequence_hashes(local, our_parent)
        run: list[StoredBlock] = []
        run_parent, run_start = our_parent, position
        previous = parent_key
        for i, (key, local_hash, seq_hash) in enumerate(zip(hashes, local, chained, strict=True)):
            block = self._blocks.get(key)
            if block is not None:
                block.copies += 1
                self.stats.duplicate_copies += 1
                self._flush(run_parent, run_start, run)
                run = []
                run_parent, run_start = block.seq_hash, position + i + 1
            else:
                copies = 1 + self._orphans.pop(key, 0)
                self._blocks[key] = _Block(seq_hash, local_hash, previous, position + i, seed, copies)
                if previous is not None:
                    self._blocks[previous].children.add(key)
                run.append(StoredBlock(seq_hash, local_hash))
            previous = key
        self._flush(run_parent, run_start, run)

    def _flush(self, parent: int | None, start: int, run: list[StoredBlock]) -> None:
        if run:
            self.stats.stored_blocks += len(run)
            self._publish(KvStored(parent, start, tuple(run)))

    def _removed(self, event: Any) -> None:
        if getattr(event, "medium", None) not in DEVICE_MEDIA:
            return
        gone: list[int] = []
        for key in event.block_hashes:
            block = self._blocks.get(key)
            if block is None:
                left = self._orphans.get(key, 0) - 1
                if left > 0:
                    self._orphans[key] = left
                else:
                    self._orphans.pop(key, None)
                continue
            block.copies -= 1
            if block.copies > 0:
                continue
            self._drop(key, block)
            gone.append(block.seq_hash)
        if gone:
            self.stats.removed_blocks += len(gone)
            self._publish(KvRemoved(tuple(gone)))

    def _drop(self, key: VllmHash, block: _Block) -> None:
        """Forget ``block`` and, as a router does, every descendant (those vLLM still holds become orphans)."""
        del self._blocks[key]
        if block.parent is not None and (parent := self._blocks.get(block.parent)) is not None:
            parent.children.discard(key)
        pending = list(block.children)
        while pending:
            child_key = pending.pop()
            child = self._blocks.pop(child_key, None)
            if child is None:
                continue
            self._orphans[child_key] = self._orphans.get(child_key, 0) + child.copies
            self.stats.orphaned_blocks += 1
            pending.extend(child.children)

    def _cleared(self) -> None:
        self._blocks.clear()
        self._orphans.clear()
        self._publish(KvCleared())

    # -- views ------------------------------------------------------------------------------

    def snapshot(self) -> list[KvStored]:
        """``stored`` events that rebuild the translated cache from empty, parents before children."""
        runs: list[tuple[int | None, int, list[StoredBlock]]] = []
        open_runs: dict[int, int] = {}  # last block of a run -> its index in runs
        for block in self._blocks.values():
            parent = self._blocks[block.parent].seq_hash if block.parent is not None else None
            index = open_runs.pop(parent, None) if parent is not None else None
            stored = StoredBlock(block.seq_hash, block.local_hash)
            if index is None:
                index = len(runs)
                runs.append((parent, block.position, [stored]))
            else:
                runs[index][2].append(stored)
            open_runs[block.seq_hash] = index
        return [KvStored(parent, start, tuple(blocks)) for parent, start, blocks in runs]

    def block_hashes(self) -> set[int]:
        """Sequence hashes (ours) of every block held: what a router's index should mirror."""
        return {block.seq_hash for block in self._blocks.values()}

    def vllm_hashes(self) -> set[VllmHash]:
        """vLLM's hashes of the same blocks."""
        return set(self._blocks)

    def orphan_hashes(self) -> set[VllmHash]:
        """vLLM hashes vLLM still holds whose prefix it no longer holds (not published)."""
        return set(self._orphans)

    def __len__(self) -> int:
        return len(self._blocks)


def _root_salt(event: Any) -> str | None:
    """The cache salt of a chain that starts at the root: vLLM publishes it, untagged, among the
    first block's extra keys (after the LoRA name when there is one)."""
    extra = getattr(event, "extra_keys", None)
    keys = extra[0] if extra else None
    if not keys:
        return None
    strings = [key for key in keys if isinstance(key, str)]
    lora = getattr(event, "lora_name", None)
    if lora and strings and strings[0] == lora:
        strings = strings[1:]
    return strings[-1] if strings else None
