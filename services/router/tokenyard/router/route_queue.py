"""The router queue: when every eligible worker is busy, a request waits for capacity instead of
being refused at once.

Busy means above a busy threshold (:mod:`tokenyard.router.busy`); without thresholds nothing is
ever busy and nothing queues. A waiting request is retried whenever load is released (a first
token, a request's end: :attr:`Scheduler.on_release`) and every ``RETRY_INTERVAL`` seconds besides
(load reports from workers release capacity the router does not hear of as an event). Order: the
higher ``priority`` hint first, then arrival. A new arrival never overtakes a backlog: while
anyone waits, it queues behind those of its priority even if a worker just became free.

Refusals, each with a message that says which:

* the queue holds ``max_size`` requests already: :class:`Overloaded` [RESOURCE_EXHAUSTED];
* it waited ``max_wait`` seconds: :class:`Overloaded` [RESOURCE_EXHAUSTED] (the service is
  overloaded, the frontend answers 529);
* the caller's own deadline is about to pass: :class:`DeadlineExceeded` [DEADLINE_EXCEEDED],
  answered just before it so the caller learns why.

A request whose route fails for another reason while it waits (its workers left) gets that error.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenyard.common.errors import DeadlineExceeded, Overloaded, TokenyardError
from tokenyard.router.metrics import RouterMetrics
from tokenyard.router.scheduler import RouteDecision, RouteQuery, Scheduler

# Seconds between retries of the queue's head when no release was heard.
RETRY_INTERVAL = 0.05
# Answer this long before the caller's deadline, so that it reads our reason, not its timeout.
DEADLINE_MARGIN = 0.05


@dataclass(order=True)
class _Waiting:
    # Sort key: higher priority first, then arrival.
    key: tuple[int, int]
    query: RouteQuery = field(compare=False)
    result: asyncio.Future[RouteDecision] = field(compare=False)
    since: float = field(compare=False)


class RouteQueue:
    def __init__(
        self,
        scheduler: Scheduler,
        *,
        max_size: int = 256,
        max_wait: float = 5.0,
        metrics: RouterMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scheduler = scheduler
        self.max_size = max_size
        self.max_wait = max_wait
        self._metrics = metrics
        self._clock = clock
        self._heap: list[_Waiting] = []
        self._arrivals = itertools.count()
        self._retry: asyncio.TimerHandle | None = None
        # Routing from the queue releases load itself (a migration frees its first assignment).
        self._kicking = False
        scheduler.on_release.append(self._kick)

    def __len__(self) -> int:
        return len(self._heap)

    async def route(self, query: RouteQuery, deadline: float | None = None) -> RouteDecision:
        """Route ``query`` now, or once a worker has room; ``deadline`` (seconds from now, the
        caller's) bounds the wait besides ``max_wait``."""
        if not self._heap or query.dry_run:
            try:
                return self._scheduler.route(query, count_overloaded=self.max_size <= 0)
            except Overloaded:
                if self.max_size <= 0 or query.dry_run:
                    raise
        else:
            # Behind a backlog: a malformed request or one no worker serves is refused now, not
            # after waiting its turn.
            self._scheduler.check(query)
        if len(self._heap) >= self.max_size:
            self._refused("full")
            raise Overloaded(
                f"every eligible worker is busy and the router queue is full ({len(self._heap)} waiting)"
            )
        loop = asyncio.get_running_loop()
        entry = _Waiting(
            (-query.hints.priority, next(self._arrivals)), query, loop.create_future(), self._clock()
        )
        heapq.heappush(self._heap, entry)
        self._observe_depth()
        self._schedule_retry()
        wait, caller = self.max_wait, False
        if deadline is not None and deadline - DEADLINE_MARGIN < wait:
            wait, caller = max(0.0, deadline - DEADLINE_MARGIN), True
        try:
            return await asyncio.wait_for(asyncio.shield(entry.result), wait)
        except TimeoutError:
            if entry.result.done() and not entry.result.cancelled():
                return entry.result.result()  # decided at the last moment
            self._remove(entry)
            waited = self._clock() - entry.since
            if caller:
                self._refused("deadline")
                raise DeadlineExceeded(
                    f"every eligible worker stayed busy; the request waited {waited:.2f} s in the "
                    "router queue, up to its deadline"
                ) from None
            self._refused("timeout")
            raise Overloaded(
                f"every eligible worker stayed busy for {waited:.2f} s, the router queue's longest wait"
            ) from None
        except asyncio.CancelledError:
            self._remove(entry)
            if entry.result.done() and not entry.result.cancelled() and entry.result.exception() is None:
                # Routed while the caller left: the record must not outlive it.
                self._scheduler.finish(query.request_id)
            raise

    def _kick(self) -> None:
        """Load was released: route from the head while workers have room."""
        if self._kicking or not self._heap:
            return
        self._kicking = True
        try:
            self._route_head()
        finally:
            self._kicking = False
        self._observe_depth()
        if self._heap:
            self._schedule_retry()

    def _route_head(self) -> None:
        while self._heap:
            entry = self._heap[0]
            if entry.result.done():
                heapq.heappop(self._heap)
                continue
            try:
                decision = self._scheduler.route(entry.query, count_overloaded=False)
            except Overloaded:
                break
            except TokenyardError as exc:
                heapq.heappop(self._heap)
                entry.result.set_exception(exc)
                continue
            heapq.heappop(self._heap)
            entry.result.set_result(decision)
            if self._metrics is not None:
                self._metrics.queue_wait.observe(self._clock() - entry.since)

    def _schedule_retry(self) -> None:
        if self._retry is None or self._retry.cancelled():
            self._retry = asyncio.get_running_loop().call_later(RETRY_INTERVAL, self._on_retry)

    def _on_retry(self) -> None:
        self._retry = None
        self._kick()

    def _remove(self, entry: _Waiting) -> None:
        try:
            self._heap.remove(entry)
        except ValueError:
            return
        heapq.heapify(self._heap)
        self._observe_depth()

    def _refused(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.rejections.labels(f"queue_{reason}").inc()

    def _observe_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._heap))
