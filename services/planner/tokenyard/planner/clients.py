"""Outbound calls: the frontends' ``/metrics`` (scraped), and every worker's per-step metrics
(``SubscribeForwardPassMetrics``, one stream per worker, followed through discovery)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import grpc

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Discovery, DiscoveryError, Instance, WatchEventKind
from tokenyard.common.tls import PLAINTEXT, Tls
from tokenyard.planner.connectors.base import pool_of
from tokenyard.planner.load import StepSample
from tokenyard.planner.observe import (
    Counters,
    FrontendCounters,
    Observation,
    ObservationError,
    parse_counters,
)
from tokenyard.planner.pools import Pool

log = logging.getLogger(__name__)


class FrontendScraper:
    """Scrapes every frontend's ``/metrics`` (from discovery, or fixed URLs) and differences them."""

    def __init__(
        self, discovery: Discovery, *, urls: Sequence[str] = (), model: str = "", timeout_s: float = 5.0
    ) -> None:
        self._discovery = discovery
        self._urls = list(urls)
        self._model = model
        self._timeout = timeout_s
        self._counters = FrontendCounters()
        self._session: aiohttp.ClientSession | None = None
        self._last_at: float | None = None

    async def _targets(self) -> list[str]:
        if self._urls:
            return self._urls
        try:
            frontends = await self._discovery.instances("frontend")
        except DiscoveryError as exc:
            raise ObservationError(f"cannot find the frontends in discovery: {exc}") from None
        return [f"http://{f.metrics_address}/metrics" for f in frontends if f.metrics_address]

    async def _get(self, url: str) -> Counters:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise ObservationError(f"{url} answered HTTP {response.status}")
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ObservationError(f"cannot scrape {url}: {type(exc).__name__} {exc}".rstrip()) from None
        return parse_counters(text, self._model)

    async def observe(self) -> Observation:
        targets = await self._targets()
        if not targets:
            raise ObservationError("no frontend is registered in discovery")
        scraped = await asyncio.gather(*(self._get(url) for url in targets), return_exceptions=True)
        errors = [str(s) for s in scraped if isinstance(s, BaseException)]
        if errors:
            raise ObservationError("; ".join(errors))
        now = time.monotonic()
        interval = now - self._last_at if self._last_at is not None else 0.0
        self._last_at = now
        counters = {url: s for url, s in zip(targets, scraped, strict=True) if isinstance(s, Counters)}
        return self._counters.update(counters, interval)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True)
class WorkerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_kv_tokens: int


def step_sample(worker_id: int, m: worker_pb2.SubscribeForwardPassMetricsResponse) -> StepSample:
    s, q = m.scheduled, m.queued
    return StepSample(
        worker_id=worker_id,
        wall_ms=m.wall_time_ms,
        prefill_requests=s.num_prefill_requests,
        prefill_tokens=s.sum_prefill_tokens,
        decode_requests=s.num_decode_requests,
        decode_kv_tokens=s.sum_decode_kv_tokens,
        queued_prefill_requests=q.num_prefill_requests,
        queued_prefill_tokens=q.sum_prefill_tokens,
        queued_decode_requests=q.num_decode_requests,
        queued_decode_kv_tokens=q.sum_decode_kv_tokens,
        dp_rank=m.dp_rank,
        timestamp_ns=m.timestamp_unix_ns,
    )


class StepSubscriber:
    """One ``SubscribeForwardPassMetrics`` stream per registered worker, resubscribing on errors."""

    def __init__(
        self,
        discovery: Discovery,
        on_sample: Callable[[Pool, StepSample], None],
        on_leave: Callable[[Pool, int], None],
        on_limits: Callable[[Pool, WorkerLimits], None] | None = None,
        *,
        retry_s: float = 1.0,
        tls: Tls = PLAINTEXT,
    ) -> None:
        self._tls = tls
        self._discovery = discovery
        self._on_sample = on_sample
        self._on_leave = on_leave
        self._on_limits = on_limits
        self._retry_s = retry_s
        self._streams: dict[int, asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watch = asyncio.create_task(self._follow(), name="planner-step-metrics")

    @property
    def workers(self) -> list[int]:
        return list(self._streams)

    async def _follow(self) -> None:
        while True:
            try:
                async for event in self._discovery.watch("worker"):
                    instance = event.instance
                    pool = pool_of(instance)
                    if pool is None:
                        continue
                    if event.kind is WatchEventKind.REMOVED:
                        self._drop(pool, instance.instance_id)
                    elif instance.instance_id not in self._streams:
                        self._streams[instance.instance_id] = asyncio.create_task(
                            self._stream(pool, instance), name=f"steps-{instance.instance_id}"
                        )
            except DiscoveryError as exc:
                log.warning("discovery watch failed, retrying in %.0fs: %s", self._retry_s, exc)
                await asyncio.sleep(self._retry_s)

    def _drop(self, pool: Pool, worker_id: int) -> None:
        task = self._streams.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self._on_leave(pool, worker_id)

    async def _stream(self, pool: Pool, instance: Instance) -> None:
        while True:
            try:
                # With mTLS, a record that is not a worker's fails the handshake.
                async with self._tls.channel(instance.address, "worker") as channel:
                    stub = worker_pb2_grpc.WorkerServiceStub(channel)
                    if self._on_limits is not None:
                        described = await stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
                        card = described.model_card
                        self._on_limits(
                            pool,
                            WorkerLimits(
                                card.max_num_seqs,
                                card.max_num_batched_tokens,
                                card.total_kv_blocks * card.kv_cache_block_size,
                            ),
                        )
                    call = stub.SubscribeForwardPassMetrics(worker_pb2.SubscribeForwardPassMetricsRequest())
                    async for message in call:
                        self._on_sample(pool, step_sample(instance.instance_id, message))
            except grpc.aio.AioRpcError as exc:
                log.debug(
                    "step metrics of worker %d: %s; resubscribing", instance.instance_id, exc.code().name
                )
            await asyncio.sleep(self._retry_s)

    async def close(self) -> None:
        tasks = [t for t in (self._watch, *self._streams.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._streams.clear()
