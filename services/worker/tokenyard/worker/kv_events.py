"""KV cache events as a worker publishes them: what a router needs to mirror the worker's cache.

A ``stored`` event carries a chain of blocks: block i's parent is block i-1, the first block's
parent is ``parent_hash`` (None = the root). Every block is named twice: by its *sequence* hash
(``block_hash``, the prefix-chained identity the engine uses to refer to it later, e.g. in
``removed``) and by its *local* hash (``tokens_hash``, content only, seeded with the request's
salt), which is what a router's radix index navigates by. Both come from
:mod:`tokenyard.common.hashing`, so a router that hashes a prompt gets the same numbers.

Event ids count up from 0 per data-parallel rank with no gaps; a subscriber that sees a jump
knows it missed something and asks for a snapshot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoredBlock:
    block_hash: int
    """Sequence hash: identity of the block together with its whole prefix."""
    tokens_hash: int
    """Local hash: the block's tokens only, seeded with the request's salt."""


@dataclass(frozen=True, slots=True)
class KvStored:
    parent_hash: int | None
    """Sequence hash of the block before ``blocks[0]``; None when the chain starts at the root."""
    start_position: int | None
    """Block index of ``blocks[0]`` within its sequence (0 = first block), for positional indexes."""
    blocks: tuple[StoredBlock, ...]


@dataclass(frozen=True, slots=True)
class KvRemoved:
    block_hashes: tuple[int, ...]
    """Sequence hashes of the blocks that left the cache."""


@dataclass(frozen=True, slots=True)
class KvCleared:
    """Everything this rank had cached is gone."""


KvEventData = KvStored | KvRemoved | KvCleared


@dataclass(frozen=True, slots=True)
class KvEvent:
    event_id: int
    """Position in this rank's stream: 0, 1, 2, ... without gaps."""
    dp_rank: int
    data: KvEventData


KvEventListener = Callable[[KvEvent], None]


class KvEventPublisher:
    """Numbers one rank's events and hands each to every listener, in order, synchronously.

    Listeners run inside the engine step that produced the event, so they must be quick (append
    to a ring buffer, put on a queue) and must not raise.
    """

    def __init__(self, dp_rank: int) -> None:
        self.dp_rank = dp_rank
        self._next_id = 0
        self._listeners: list[KvEventListener] = []

    @property
    def last_event_id(self) -> int:
        """Id of the newest event published, -1 before the first."""
        return self._next_id - 1

    def subscribe(self, listener: KvEventListener) -> Callable[[], None]:
        """Call ``listener`` for every later event; returns the function that stops it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, data: KvEventData) -> KvEvent:
        event = KvEvent(event_id=self._next_id, dp_rank=self.dp_rank, data=data)
        self._next_id += 1
        for listener in tuple(self._listeners):
            listener(event)
        return event
