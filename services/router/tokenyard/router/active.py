"""Requests the router has routed and not yet seen end: each lifecycle step applies exactly once.

A frontend may retry a notification (a lost reply, a migration), so every step is idempotent
by request id: the first ``first_token`` and the first ``finished`` are applied, later copies
are acknowledged and ignored. Entries whose end never arrives (a frontend that crashed) expire.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class Outcome(Enum):
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class ActiveRequest:
    request_id: str
    worker_id: int
    dp_rank: int
    prompt_tokens: int
    cached_tokens: int
    started_at: float = field(default_factory=time.monotonic)
    first_token_seen: bool = False

    @property
    def prefill_tokens(self) -> int:
        return 0 if self.first_token_seen else max(0, self.prompt_tokens - self.cached_tokens)


@dataclass
class WorkerLoad:
    active_requests: int = 0
    active_prefill_tokens: int = 0


class ActiveRequests:
    def __init__(self, expiry_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._expiry = expiry_seconds
        # Insertion order is start order, so expiry only ever looks at the head.
        self._requests: OrderedDict[str, ActiveRequest] = OrderedDict()
        self._load: dict[int, WorkerLoad] = {}
        self._clock = clock

    def add(self, request: ActiveRequest) -> bool:
        """Track a routed request; False if the id is already active (a re-route keeps the first)."""
        if request.request_id in self._requests:
            return False
        request.started_at = self._clock()
        self._requests[request.request_id] = request
        load = self._load.setdefault(request.worker_id, WorkerLoad())
        load.active_requests += 1
        load.active_prefill_tokens += request.prefill_tokens
        return True

    def first_token(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None or req.first_token_seen:
            return False
        self._load[req.worker_id].active_prefill_tokens -= req.prefill_tokens
        req.first_token_seen = True
        return True

    def finish(self, request_id: str, outcome: Outcome) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._release(req)
        return True

    def _release(self, req: ActiveRequest) -> None:
        load = self._load[req.worker_id]
        load.active_prefill_tokens -= req.prefill_tokens
        load.active_requests -= 1
        if load.active_requests == 0:
            del self._load[req.worker_id]

    def drop_worker(self, worker_id: int) -> int:
        gone = [rid for rid, r in self._requests.items() if r.worker_id == worker_id]
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

    def load(self, worker_id: int) -> WorkerLoad:
        return self._load.get(worker_id, WorkerLoad())

    def get(self, request_id: str) -> ActiveRequest | None:
        return self._requests.get(request_id)

    def __len__(self) -> int:
        return len(self._requests)
