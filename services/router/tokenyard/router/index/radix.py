"""Radix tree over local block hashes: the reference semantics of the KV index.

A node is a prefix (the path of local hashes from the root); it records which ranks hold it and
under which sequence hash each one does. Per rank, ``lookup`` maps sequence hash -> node, so that
a stored chain finds its parent and a removal finds its blocks. Written for clarity first: it is
the oracle the positional index is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenyard.router.index import Chain, InvalidEvent, Prompt, WorkerRank, check_store_args


class _Node:
    __slots__ = ("children", "depth", "local", "parent", "workers")

    def __init__(self, parent: _Node | None, local: int, depth: int) -> None:
        self.parent = parent
        self.local = local
        self.depth = depth
        self.children: dict[int, _Node] = {}
        # rank -> the sequence hash that rank reported for this block
        self.workers: dict[WorkerRank, int] = {}


class RadixIndex:
    def __init__(self) -> None:
        self._root = _Node(None, 0, -1)
        self._lookup: dict[WorkerRank, dict[int, _Node]] = {}

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
        lookup = self._lookup.get(rank, {})
        if parent_hash is None:
            parent = self._root
        else:
            found = lookup.get(parent_hash)
            if found is None:
                raise InvalidEvent(InvalidEvent.UNKNOWN_PARENT, f"parent {parent_hash:#x} is not held")
            parent = found
        if start_position is not None and start_position != parent.depth + 1:
            raise InvalidEvent(
                InvalidEvent.BAD_POSITION, f"start position {start_position}, parent depth {parent.depth}"
            )
        walk: _Node | None = parent
        for block_hash, local in zip(block_hashes, tokens_hashes, strict=True):
            child = walk.children.get(local) if walk is not None else None
            if child is not None:
                held = child.workers.get(rank)
                if held is not None and held != block_hash:
                    raise InvalidEvent(
                        InvalidEvent.CONFLICT, f"block held as {held:#x}, stored as {block_hash:#x}"
                    )
            known = lookup.get(block_hash)
            if known is not None and known is not child:
                raise InvalidEvent(InvalidEvent.CONFLICT, f"{block_hash:#x} names another block")
            walk = child
        if not block_hashes:
            return
        lookup = self._lookup.setdefault(rank, lookup)
        node = parent
        for block_hash, local in zip(block_hashes, tokens_hashes, strict=True):
            child = node.children.get(local)
            if child is None:
                child = node.children[local] = _Node(node, local, node.depth + 1)
            child.workers[rank] = block_hash
            lookup[block_hash] = child
            node = child

    def remove(self, rank: WorkerRank, block_hashes: Sequence[int]) -> int:
        lookup = self._lookup.get(rank)
        unknown = 0
        for block_hash in block_hashes:
            node = lookup.get(block_hash) if lookup is not None else None
            if node is None:
                unknown += 1
                continue
            assert lookup is not None
            self._drop(rank, node, lookup)
        if lookup is not None and not lookup:
            del self._lookup[rank]
        return unknown

    def _drop(self, rank: WorkerRank, node: _Node, lookup: dict[int, _Node]) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            block_hash = n.workers.pop(rank, None)
            if block_hash is None:
                continue
            del lookup[block_hash]
            stack.extend(c for c in n.children.values() if rank in c.workers)
            if not n.workers:
                self._detach(n)

    def _detach(self, node: _Node) -> None:
        # An empty node's subtree is empty too (every rank's blocks are prefix-closed).
        parent = node.parent
        if parent is not None and parent.children.get(node.local) is node:
            del parent.children[node.local]

    def clear(self, rank: WorkerRank) -> None:
        lookup = self._lookup.pop(rank, None)
        if lookup is None:
            return
        for node in lookup.values():
            node.workers.pop(rank, None)
            if not node.workers:
                self._detach(node)

    def remove_worker(self, worker_id: int) -> None:
        for rank in [r for r in self._lookup if r.worker_id == worker_id]:
            self.clear(rank)

    # -- queries --------------------------------------------------------------------------------

    def find_matches(self, prompt: Prompt, early_exit: bool = False) -> dict[WorkerRank, int]:
        scores: dict[WorkerRank, int] = {}
        node = self._root
        candidates: set[WorkerRank] | None = None
        matched = 0
        for local in prompt.local:
            child = node.children.get(local)
            if child is None:
                break
            if candidates is None:
                candidates = set(child.workers)
            else:
                kept = candidates & child.workers.keys()
                for rank in candidates - kept:
                    scores[rank] = matched
                candidates = kept
            if not candidates:
                return scores
            matched += 1
            if early_exit and len(candidates) == 1:
                break
            node = child
        for rank in candidates or ():
            scores[rank] = matched
        return scores

    def ranks(self) -> list[WorkerRank]:
        return list(self._lookup)

    def num_blocks(self, rank: WorkerRank | None = None) -> int:
        if rank is not None:
            return len(self._lookup.get(rank, ()))
        return sum(len(lookup) for lookup in self._lookup.values())

    def dump(self, rank: WorkerRank) -> list[Chain]:
        lookup = self._lookup.get(rank)
        if not lookup:
            return []
        chains: list[Chain] = []
        # (node, parent hash) pairs that start a chain, depth-first
        starts: list[tuple[_Node, int | None]] = [
            (c, None) for c in self._root.children.values() if rank in c.workers
        ]
        while starts:
            node, parent_hash = starts.pop()
            chain = Chain(parent_hash)
            chains.append(chain)
            while True:
                block_hash = node.workers[rank]
                chain.block_hashes.append(block_hash)
                chain.tokens_hashes.append(node.local)
                held = [c for c in node.children.values() if rank in c.workers]
                if not held:
                    break
                node = held[0]
                starts.extend((c, block_hash) for c in held[1:])
        return chains
