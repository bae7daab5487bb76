"""Requests the router has routed and not yet seen end, and the load they put on each worker rank.

Every lifecycle step applies exactly once: a frontend may retry a notification (a lost reply, a
migration), so each step is idempotent by request id: the first ``first_token`` and the first
``finish`` are applied, later copies are acknowledged and ignored. Entries whose end never
arrives (a frontend that crashed, a peer router's lost event) expire.

Predicted load per rank (no feedback from the engine needed):

* ``active_requests``;
* ``active_prefill_tokens``: prompt tokens not predicted cached, until the first token;
* ``active_blocks``: distinct prompt blocks referenced by active requests (refcounted by sequence
  hash), so that requests sharing a prefix count it once.

What a request counts as depends on the pool it was routed in (:data:`POOL_TRACKING`): in the
prefill pool only its prompt (its worker emits one token and hands the KV over, so it never
decodes), in the decode pool only its blocks (its prompt was computed by a prefill worker), and
in the others both.

A request contributes all of its prompt's sequence hashes, so each rank's set of active blocks is
prefix-closed; :meth:`ActiveRequests.overlap` reuses the KV index's jump search over bitmasks to
tell, per rank, how many leading blocks of a new prompt are active there already.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

from tokenyard.router.index import WorkerRank
from tokenyard.router.index.prefix import SlotTable, longest_prefixes

# Per pool (RouteQuery.pool): whether a request routed there counts (prefill tokens, decode blocks).
POOL_TRACKING: dict[str, tuple[bool, bool]] = {
    "": (True, True),
    "aggregated": (True, True),
    "prefill": (True, False),
    "decode": (False, True),
}


class Outcome(Enum):
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class ActiveRequest:
    request_id: str
    worker_id: int
    dp_rank: int
    prompt_tokens: int
    cached_tokens: int
    # Sequence hashes of the prompt's complete blocks.
    block_hashes: Sequence[int] = ()
    # Router that routed it: "" for this one, else the peer's id (replica sync).
    origin: str = ""
    expected_output_tokens: int | None = None
    started_at: float = field(default_factory=time.monotonic)
    first_token_seen: bool = False
    # Whether its prompt counts as prefill load until its first token (not in the decode pool).
    track_prefill: bool = True

    @property
    def prefill_tokens(self) -> int:
        if self.first_token_seen or not self.track_prefill:
            return 0
        return max(0, self.prompt_tokens - self.cached_tokens)

    @property
    def rank(self) -> WorkerRank:
        return WorkerRank(self.worker_id, self.dp_rank)


def routed_request(
    request_id: str,
    worker_id: int,
    dp_rank: int,
    prompt_tokens: int,
    cached_tokens: int,
    block_hashes: Sequence[int],
    pool: str = "",
    *,
    origin: str = "",
    expected_output_tokens: int | None = None,
) -> ActiveRequest:
    """A request routed in ``pool``, counting the load that pool tracks (:data:`POOL_TRACKING`)."""
    track_prefill, track_blocks = POOL_TRACKING.get(pool, (True, True))
    return ActiveRequest(
        request_id,
        worker_id,
        dp_rank,
        prompt_tokens,
        cached_tokens,
        block_hashes=block_hashes if track_blocks else (),
        origin=origin,
        expected_output_tokens=expected_output_tokens,
        track_prefill=track_prefill,
    )


@dataclass(slots=True)
class WorkerLoad:
    """Predicted load of one rank."""

    active_requests: int = 0
    active_prefill_tokens: int = 0
    active_blocks: int = 0
    # Output tokens the active requests said they expect (those that said; future decode load).
    expected_output_tokens: int = 0


class _Rank:
    __slots__ = ("load", "refs", "slot")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.refs: dict[int, int] = {}
        self.load = WorkerLoad()


class ActiveRequests:
    def __init__(
        self, expiry_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic, jump: int = 32
    ) -> None:
        self._expiry = expiry_seconds
        self._clock = clock
        self._jump = jump
        # Insertion order is start order, so expiry only ever looks at the head.
        self._requests: OrderedDict[str, ActiveRequest] = OrderedDict()
        self._ranks: dict[WorkerRank, _Rank] = {}
        self._slots: SlotTable[WorkerRank] = SlotTable()
        self._mask: dict[int, int] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def add(self, request: ActiveRequest) -> bool:
        """Track a routed request; False if the id is already active (the first one stays)."""
        if request.request_id in self._requests:
            return False
        request.started_at = self._clock()
        self._requests[request.request_id] = request
        rank = request.rank
        state = self._ranks.get(rank)
        if state is None:
            state = self._ranks[rank] = _Rank(self._slots.acquire(rank))
        state.load.active_requests += 1
        state.load.active_prefill_tokens += request.prefill_tokens
        state.load.expected_output_tokens += request.expected_output_tokens or 0
        refs, mask, bit = state.refs, self._mask, 1 << state.slot
        for h in request.block_hashes:
            n = refs.get(h)
            if n is None:
                refs[h] = 1
                mask[h] = mask.get(h, 0) | bit
            else:
                refs[h] = n + 1
        state.load.active_blocks = len(refs)
        return True

    def first_token(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None or req.first_token_seen:
            return False
        self._ranks[req.rank].load.active_prefill_tokens -= req.prefill_tokens
        req.first_token_seen = True
        return True

    def finish(self, request_id: str, outcome: Outcome = Outcome.FINISHED) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._release(req)
        return True

    def _release(self, req: ActiveRequest) -> None:
        rank = req.rank
        state = self._ranks[rank]
        state.load.active_prefill_tokens -= req.prefill_tokens
        state.load.active_requests -= 1
        state.load.expected_output_tokens -= req.expected_output_tokens or 0
        refs, mask, keep = state.refs, self._mask, ~(1 << state.slot)
        for h in req.block_hashes:
            n = refs.get(h)
            if n is None:  # a prompt that repeats a sequence hash released it already
                continue
            if n > 1:
                refs[h] = n - 1
                continue
            del refs[h]
            m = mask[h] & keep
            if m:
                mask[h] = m
            else:
                del mask[h]
        state.load.active_blocks = len(refs)
        if state.load.active_requests == 0:
            assert not refs, "blocks left on a rank without requests"
            del self._ranks[rank]
            self._slots.release(rank)

    def drop_worker(self, worker_id: int) -> int:
        """Forget every request routed to a worker that left; returns how many."""
        gone = [rid for rid, r in self._requests.items() if r.worker_id == worker_id]
        for rid in gone:
            self._release(self._requests.pop(rid))
        return len(gone)

    def drop_origin(self, origin: str) -> int:
        """Forget every request a peer router reported (it left; its frees will never come)."""
        gone = [rid for rid, r in self._requests.items() if r.origin == origin]
        for rid in gone:
            self._release(self._requests.pop(rid))
        return len(gone)

    def expire(self) -> int:
        """Forget requests older than the expiry horizon; returns how many."""
        horizon = self._clock() - self._expiry
        count = 0
        while self._requests:
            rid, req = next(iter(self._requests.items()))
            if req.started_at > horizon:
                break
            self._release(self._requests.pop(rid))
            count += 1
        return count

    # -- queries --------------------------------------------------------------------------------

    def load(self, worker_id: int, dp_rank: int = 0) -> WorkerLoad:
        state = self._ranks.get(WorkerRank(worker_id, dp_rank))
        return state.load if state is not None else WorkerLoad()

    def loads(self) -> dict[WorkerRank, WorkerLoad]:
        return {rank: state.load for rank, state in self._ranks.items()}

    def overlap(self, block_hashes: Sequence[int]) -> dict[WorkerRank, int]:
        """Per rank, how many leading blocks of a prompt (by sequence hash) are active there."""
        scores = longest_prefixes(self._mask, block_hashes, self._jump)
        key = self._slots.key
        return {key(slot): n for slot, n in scores.items()}

    def get(self, request_id: str) -> ActiveRequest | None:
        return self._requests.get(request_id)

    def __iter__(self) -> Iterator[ActiveRequest]:
        return iter(list(self._requests.values()))

    def __len__(self) -> int:
        return len(self._requests)
