"""Session affinity: a conversation's follow-up turns go where its history is.

A request that carries a session id (``RouteHints.session_id``) is bound to the rank it was routed
to; the next turn of that session goes there again unless that worker is not eligible (left,
filtered out by the request) or busy (a busy threshold, or in the kv mode a KV cache that cannot
hold the turn beside the requests running there), in which case it is routed as usual and the
session moves with it. Bindings expire ``ttl`` seconds after their last use, and at most
``max_sessions`` are kept (least recently used go first), so a client inventing ids cannot grow
the table without bound.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from tokenyard.router.index import WorkerRank

# Longest session id accepted, in characters: ids are keys, not payloads.
MAX_SESSION_ID = 256


class SessionTable:
    def __init__(
        self, ttl: float = 600.0, max_sessions: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max = max_sessions
        self._clock = clock
        # session id -> (rank, last use), least recently used first.
        self._bound: OrderedDict[str, tuple[WorkerRank, float]] = OrderedDict()

    def get(self, session_id: str) -> WorkerRank | None:
        entry = self._bound.get(session_id)
        if entry is None:
            return None
        rank, used = entry
        if self._clock() - used > self._ttl:
            del self._bound[session_id]
            return None
        return rank

    def bind(self, session_id: str, rank: WorkerRank) -> None:
        self._bound[session_id] = (rank, self._clock())
        self._bound.move_to_end(session_id)
        while len(self._bound) > self._max:
            self._bound.popitem(last=False)

    def forget_worker(self, worker_id: int) -> None:
        for sid in [s for s, (rank, _) in self._bound.items() if rank.worker_id == worker_id]:
            del self._bound[sid]

    def __len__(self) -> int:
        return len(self._bound)
