"""When to send: fixed concurrency, a request rate (Poisson or constant arrivals), or a trace's schedule.

The runner only schedules; sending is a callable, so the same loops drive HTTP in a run and
plain coroutines in tests. Every request that was sent is awaited: a duration bound stops new
requests, never cuts the ones in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from bench.loadgen.client import RequestRecord
from bench.loadgen.progress import Progress
from bench.loadgen.workload import RequestSpec

Send = Callable[[RequestSpec], Awaitable[RequestRecord]]
Arrival = Literal["poisson", "constant"]


@dataclass(frozen=True)
class LoadShape:
    concurrency: int | None = None
    """Closed loop: this many requests in flight at all times."""
    rate: float | None = None
    """Open loop: requests per second."""
    arrival: Arrival = "poisson"
    fixed_schedule: bool = False
    """Open loop at the workload's own arrival times (trace timestamps)."""
    speedup: float = 1.0
    """Fixed schedule only: replay this many times faster than recorded."""
    max_concurrency: int | None = None
    """Open loop only: requests beyond this many in flight wait for a free slot."""
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        modes = (self.concurrency is not None) + (self.rate is not None) + self.fixed_schedule
        if modes != 1:
            raise ValueError("choose exactly one of concurrency, rate and fixed schedule")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.speedup <= 0:
            raise ValueError("speedup must be positive")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.num_requests is not None and self.num_requests < 0:
            raise ValueError("num_requests must be >= 0")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be positive")

    @property
    def mode(self) -> str:
        if self.concurrency is not None:
            return "concurrency"
        return "schedule" if self.fixed_schedule else "rate"

    @property
    def pool_size(self) -> int:
        """Connections to keep: the concurrency, or 0 (no limit) for an unbounded open loop."""
        return self.concurrency or self.max_concurrency or 0


@dataclass(frozen=True)
class LoadResult:
    records: list[RequestRecord]
    duration_s: float
    """From the first send to the end of the last request."""


async def run_load(
    send: Send,
    specs: Iterable[RequestSpec],
    shape: LoadShape,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """Sends ``specs`` as ``shape`` says until the specs, the count or the duration run out, or ``stop`` is set."""
    it: Iterator[RequestSpec] = iter(specs)
    if shape.num_requests is not None:
        it = itertools.islice(it, shape.num_requests)
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    deadline = None if shape.duration_s is None else t0 + shape.duration_s

    def stopped(at: float) -> bool:
        return (deadline is not None and at >= deadline) or (stop is not None and stop.is_set())

    async def one(spec: RequestSpec) -> None:
        if progress is not None:
            progress.request_sent()
        record = await send(spec)
        records.append(record)
        if progress is not None:
            progress.request_done(record)

    if shape.concurrency is not None:

        async def worker() -> None:
            # The iterator is shared: next() runs without awaiting, so no two workers interleave in it.
            for spec in it:
                if stopped(time.perf_counter()):
                    return
                await one(spec)

        await asyncio.gather(*(worker() for _ in range(shape.concurrency)))
    else:
        await _open_loop(one, it, shape, t0, stopped, stop)
    end = max((r.end_s for r in records), default=t0)
    return LoadResult(records, max(end - t0, 0.0))


async def _open_loop(
    one: Callable[[RequestSpec], Awaitable[None]],
    it: Iterator[RequestSpec],
    shape: LoadShape,
    t0: float,
    stopped: Callable[[float], bool],
    stop: asyncio.Event | None,
) -> None:
    rng = random.Random(shape.seed)
    slots = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
    tasks: list[asyncio.Task[None]] = []

    async def limited(spec: RequestSpec) -> None:
        if slots is None:
            await one(spec)
        else:
            async with slots:
                await one(spec)

    next_at = t0
    schedule_base: float | None = None
    for spec in it:
        if shape.fixed_schedule:
            if spec.arrival_s is None:
                raise ValueError(f"request {spec.index} has no timestamp to replay")
            if schedule_base is None:
                schedule_base = spec.arrival_s
            next_at = t0 + (spec.arrival_s - schedule_base) / shape.speedup
        if stopped(next_at):
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            if stop is None:
                await asyncio.sleep(delay)
            else:
                # Wake early when stopped, instead of sleeping through a long gap in a trace.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
        tasks.append(asyncio.create_task(limited(spec)))
        if not shape.fixed_schedule:
            assert shape.rate is not None
            next_at += rng.expovariate(shape.rate) if shape.arrival == "poisson" else 1.0 / shape.rate
    await asyncio.gather(*tasks)
