"""The KV index: which worker ranks hold which cached prefixes, behind one interface.

Two implementations answer the same questions with the same results:

* :class:`tokenyard.router.index.radix.RadixIndex`, a radix tree over local block hashes: the reference
  semantics, simple enough to trust, used as the oracle in property tests;
* :class:`tokenyard.router.index.positional.PositionalIndex`, flat integer-keyed maps and bitmasks with a
  jump search: the fast one the service runs by default.

Semantics shared by both (see the worker contract, ``KvStored``/``KvRemoved``/``KvCleared``):

* ``store`` adds a chain of blocks under a parent the rank already holds (or at the root). The
  event is validated as a whole before anything changes, so a rejected event leaves no trace.
* ``remove`` evicts blocks by sequence hash, and with them every descendant the rank holds:
  "their descendants are gone too". Hence a rank's blocks always form prefix-closed paths, which
  is what lets the positional index skip ahead (holding block k implies holding blocks 0..k-1).
* ``find_matches`` returns, per rank, how many leading blocks of a prompt it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from tokenyard.common.hashing import sequence_hashes


class WorkerRank(NamedTuple):
    """A routing target: one data-parallel rank of one worker."""

    worker_id: int
    dp_rank: int


class InvalidEvent(Exception):
    """A KV event the index refuses; nothing was applied. ``reason`` labels metrics."""

    UNKNOWN_PARENT = "unknown_parent"
    BAD_POSITION = "bad_position"
    CONFLICT = "conflict"
    DUPLICATE_BLOCK = "duplicate_block"
    MALFORMED = "malformed"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Prompt:
    """The complete blocks of one prompt: local hashes, and sequence hashes chained on demand.

    The radix tree navigates by local hashes; the positional index and the active-block tracker
    key by sequence hash, so the chain is computed at most once per request, and not at all when
    the caller already sent it.
    """

    __slots__ = ("_chain", "local")

    def __init__(self, local: Sequence[int], chain: Sequence[int] | None = None) -> None:
        if chain is not None and len(chain) != len(local):
            raise ValueError("sequence hashes must be as many as local hashes")
        self.local = local
        self._chain = chain

    @property
    def chain(self) -> Sequence[int]:
        if self._chain is None:
            self._chain = sequence_hashes(self.local)
        return self._chain

    @property
    def chained(self) -> bool:
        return self._chain is not None

    def __len__(self) -> int:
        return len(self.local)


@dataclass(slots=True)
class Chain:
    """Blocks in chain order under ``parent_hash`` (None: the root), as a dump reports them."""

    parent_hash: int | None
    block_hashes: list[int] = field(default_factory=list)
    tokens_hashes: list[int] = field(default_factory=list)


class KvIndex(Protocol):
    def store(
        self,
        rank: WorkerRank,
        parent_hash: int | None,
        block_hashes: Sequence[int],
        tokens_hashes: Sequence[int],
        start_position: int | None = None,
    ) -> None:
        """Add a chain of blocks; raises :class:`InvalidEvent` (and changes nothing) when the
        parent is unknown, ``start_position`` disagrees with the parent's depth, a block hash is
        repeated, or a block hash already names a different block of this rank."""
        ...

    def remove(self, rank: WorkerRank, block_hashes: Sequence[int]) -> int:
        """Evict blocks and their descendants held by ``rank``; returns how many hashes were unknown."""
        ...

    def clear(self, rank: WorkerRank) -> None:
        """Forget every block of ``rank``."""
        ...

    def remove_worker(self, worker_id: int) -> None:
        """Forget every rank of a worker."""
        ...

    def find_matches(self, prompt: Prompt, early_exit: bool = False) -> dict[WorkerRank, int]:
        """Leading blocks of ``prompt`` each rank holds (ranks holding none are absent).

        With ``early_exit`` the search stops once a single rank is left; that rank's score is then
        one more than the best score among the others, not necessarily its full overlap.
        """
        ...

    def ranks(self) -> list[WorkerRank]:
        """Ranks holding at least one block."""
        ...

    def num_blocks(self, rank: WorkerRank | None = None) -> int:
        """Blocks held by ``rank``, or by all ranks together (a block held twice counts twice)."""
        ...

    def dump(self, rank: WorkerRank) -> list[Chain]:
        """The blocks of ``rank`` as chains, parents before children: storing them in order into an
        empty index reproduces them."""
        ...


def check_store_args(
    block_hashes: Sequence[int], tokens_hashes: Sequence[int], start_position: int | None
) -> None:
    """The validation that needs no index state, shared so both indexes reject alike."""
    if len(block_hashes) != len(tokens_hashes):
        raise InvalidEvent(InvalidEvent.MALFORMED, "block and tokens hashes differ in number")
    if start_position is not None and start_position < 0:
        raise InvalidEvent(InvalidEvent.MALFORMED, "negative start position")
    if len(set(block_hashes)) != len(block_hashes):
        raise InvalidEvent(InvalidEvent.DUPLICATE_BLOCK, "a block hash repeats within the event")


INDEX_KINDS = ("positional", "radix")


def make_index(kind: str, *, jump: int = 32) -> KvIndex:
    # Imported here: each implementation imports this module for the shared types.
    from tokenyard.router.index.positional import PositionalIndex
    from tokenyard.router.index.radix import RadixIndex

    if kind == "positional":
        return PositionalIndex(jump=jump)
    if kind == "radix":
        return RadixIndex()
    raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}")
