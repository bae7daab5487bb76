"""Per-step engine metrics for the planner: numbered per rank, live only, never blocking the engine.

Every engine step that did work becomes a sample with the rank's next ``step_id``; a rank that did
no step during a heartbeat period gets an idle sample (``wall_time_s == 0``), so that a planner can
tell an idle worker from a silent one. Ids count every sample since the worker started, whether
anyone listened or not; a subscriber's queue is bounded and drops its oldest samples when full,
which the subscriber sees as a jump in ``step_id``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from tokenyard.common.errors import InvalidArgument, Unavailable
from tokenyard.worker.engines.base import Engine, StepMetrics, StepMetricsSource, StepRequests


@dataclass(frozen=True, slots=True)
class ForwardPassSample:
    step_id: int
    metrics: StepMetrics


class ForwardPassHub:
    def __init__(self, engine: Engine, *, queue_size: int = 1024) -> None:
        self._engine = engine
        self._queue_size = queue_size
        self._next_step: dict[int, int] = {}
        self._stepped: set[int] = set()
        self._subscriptions: set[ForwardPassSubscription] = set()
        self._closed = False
        # An engine without per-step metrics still gets idle heartbeats, so subscribers see it live.
        self._unsubscribe = (
            engine.subscribe_steps(self._on_step) if isinstance(engine, StepMetricsSource) else lambda: None
        )

    def _on_step(self, metrics: StepMetrics) -> None:
        self._stepped.add(metrics.dp_rank)
        self._publish(metrics)

    def _publish(self, metrics: StepMetrics) -> None:
        rank = metrics.dp_rank
        step_id = self._next_step.get(rank, 0)
        self._next_step[rank] = step_id + 1
        sample = ForwardPassSample(step_id, metrics)
        for subscription in self._subscriptions:
            subscription.offer(sample)

    def heartbeat(self) -> None:
        """Publish an idle sample for every rank that did no step since the previous heartbeat."""
        now = time.time_ns()
        for rank in range(self._engine.info().dp_size):
            if rank not in self._stepped:
                self._publish(StepMetrics(rank, 0.0, StepRequests(), StepRequests(), now))
        self._stepped.clear()

    def subscribe(self, dp_rank: int | None) -> ForwardPassSubscription:
        if self._closed:
            raise Unavailable("the worker is shutting down")
        dp_size = self._engine.info().dp_size
        if dp_rank is not None and not 0 <= dp_rank < dp_size:
            raise InvalidArgument(f"dp_rank {dp_rank} out of range: this worker has ranks 0..{dp_size - 1}")
        subscription = ForwardPassSubscription(self, dp_rank, self._queue_size)
        self._subscriptions.add(subscription)
        return subscription

    def close(self) -> None:
        self._closed = True
        for subscription in tuple(self._subscriptions):
            subscription.close()
        self._unsubscribe()

    def _remove(self, subscription: ForwardPassSubscription) -> None:
        self._subscriptions.discard(subscription)


class ForwardPassSubscription:
    def __init__(self, hub: ForwardPassHub, dp_rank: int | None, max_queued: int) -> None:
        self._hub = hub
        self._dp_rank = dp_rank
        self._queue: deque[ForwardPassSample] = deque(maxlen=max_queued)
        self._closed = False
        self._wake = asyncio.Event()

    def offer(self, sample: ForwardPassSample) -> None:
        if self._closed or (self._dp_rank is not None and sample.metrics.dp_rank != self._dp_rank):
            return
        self._queue.append(sample)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def samples(self) -> AsyncGenerator[ForwardPassSample, None]:
        """Every later sample until the hub closes; leaving the loop unsubscribes."""
        try:
            while True:
                while self._queue:
                    yield self._queue.popleft()
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
        finally:
            self._closed = True
            self._hub._remove(self)
