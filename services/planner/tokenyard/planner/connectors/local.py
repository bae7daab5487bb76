"""The ``local`` connector: worker processes on this host, beside a ``tokenyard up`` deployment.

It starts workers with the deployment's flags (engine, model, discovery, role per pool) and
counts a pool's replicas as the workers registered in discovery, its own and those ``tokenyard
up`` started. It stops only workers it started, newest first, draining each before it stops;
the workers ``tokenyard up`` started stay, so they are the floor the planner can scale down to.
A new worker counts once it reports SERVING (its engine loaded and it registered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tokenyard.common.discovery import Discovery
from tokenyard.common.tls import PLAINTEXT, Tls
from tokenyard.deploy.workers import WorkerLaunch, WorkerProcess, WorkerStartError, free_port, reap_leftovers
from tokenyard.planner.connectors.base import ConnectorError, count_workers
from tokenyard.planner.pools import Pool

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 3.0


@dataclass(frozen=True)
class LocalOptions:
    engine: str
    model: str
    host: str
    discovery: str
    state_dir: Path
    log_level: str = "info"
    extra_args: tuple[str, ...] = ()
    first_port: int = 0
    """0: any free port."""
    first_metrics_port: int = 0
    max_workers: int = 16
    drain_grace_s: float = 30.0
    ready_timeout_s: float = 120.0
    tls: Tls = PLAINTEXT
    """The planner's certificate, for the health checks and Drain of the workers it starts."""


class LocalConnector:
    def __init__(self, options: LocalOptions, discovery: Discovery) -> None:
        self.options = options
        self._discovery = discovery
        self._own: dict[Pool, list[WorkerProcess]] = {pool: [] for pool in Pool}
        self._serial = 0
        self._ports_used: set[int] = set()
        reaped = reap_leftovers(options.state_dir)
        if reaped:
            log.warning("stopped %d worker(s) a previous planner left running: %s", len(reaped), reaped)

    def name(self) -> str:
        return "local"

    @property
    def own_workers(self) -> dict[Pool, list[WorkerProcess]]:
        return {pool: list(workers) for pool, workers in self._own.items()}

    async def current_replicas(self) -> dict[Pool, int]:
        return await count_workers(self._discovery)

    def _ports(self) -> tuple[int, int]:
        o = self.options
        if not o.first_port:
            return free_port(o.host), free_port(o.host)
        for i in range(o.max_workers * 4):
            port = o.first_port + i
            if port not in self._ports_used:
                self._ports_used.add(port)
                metrics = o.first_metrics_port + i if o.first_metrics_port else free_port(o.host)
                return port, metrics
        raise ConnectorError(f"no free port left in {o.first_port}..{o.first_port + o.max_workers * 4}")

    def _new_worker(self, pool: Pool) -> WorkerProcess:
        o = self.options
        self._serial += 1
        port, metrics_port = self._ports()
        launch = WorkerLaunch(o.engine, o.model, pool.value, o.host, o.discovery, o.log_level, o.extra_args)
        return WorkerProcess(
            f"planner-{pool.value}-{self._serial}", launch, port, metrics_port, o.state_dir, o.tls
        )

    async def _start(self, pool: Pool) -> WorkerProcess:
        worker = self._new_worker(pool)
        self._own[pool].append(worker)
        try:
            await worker.start()
            await worker.wait_ready(self.options.ready_timeout_s)
        except (WorkerStartError, OSError, asyncio.CancelledError) as exc:
            self._own[pool].remove(worker)
            self._release(worker)
            await worker.stop(0.0)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ConnectorError(f"{pool.value} worker did not start: {exc}") from None
        log.info(
            "started %s worker %s at %s in %.1fs",
            pool.value,
            worker.name,
            worker.address,
            time.monotonic() - worker.started_at,
        )
        return worker

    def _release(self, worker: WorkerProcess) -> None:
        self._ports_used.discard(worker.port)

    async def _stop(self, pool: Pool, worker: WorkerProcess, grace_s: float | None = None) -> None:
        self._own[pool].remove(worker)
        self._release(worker)
        code = await worker.stop(self.options.drain_grace_s if grace_s is None else grace_s)
        log.info("stopped %s worker %s (exit code %s)", pool.value, worker.name, code)

    async def scale(self, target: dict[Pool, int], decision_id: int) -> None:
        current = await self.current_replicas()
        tasks: list[asyncio.Task[object]] = []
        problems: list[str] = []
        owned = sum(len(w) for w in self._own.values())
        for pool, wanted in target.items():
            diff = wanted - current.get(pool, 0)
            if diff > 0:
                room = self.options.max_workers - owned
                if diff > room:
                    problems.append(
                        f"{pool.value}: {diff} more wanted, but the planner may run {self.options.max_workers} "
                        f"workers at most (--local-max-workers) and runs {owned}"
                    )
                    diff = max(0, room)
                owned += diff
                tasks += [asyncio.create_task(self._start(pool)) for _ in range(diff)]
            elif diff < 0:
                mine = self._own[pool]
                if -diff > len(mine):
                    problems.append(
                        f"{pool.value}: {-diff} fewer wanted, but only {len(mine)} of the "
                        f"{current.get(pool, 0)} workers were started by the planner"
                    )
                victims = mine[::-1][: min(-diff, len(mine))]
                tasks += [asyncio.create_task(self._stop(pool, w)) for w in victims]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            raise
        problems += [str(r) for r in results if isinstance(r, BaseException)]
        if problems:
            raise ConnectorError("; ".join(problems))

    async def close(self) -> None:
        # The planner stops with its deployment (after the frontend): a short drain, so that a
        # supervisor's grace period does not run out and orphan the workers.
        grace = min(self.options.drain_grace_s, CLOSE_GRACE_S)
        workers = [(pool, w) for pool, ws in self._own.items() for w in ws]
        await asyncio.gather(*(self._stop(pool, w, grace) for pool, w in workers), return_exceptions=True)
