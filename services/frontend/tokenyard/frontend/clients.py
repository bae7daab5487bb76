"""Outbound calls: the routers (Route and lifecycle notifications, with failover between
replicas) and the workers (Generate).

This is the edge where the router's and worker's protobufs are translated to and from the
domain types of :mod:`tokenyard.frontend.generation`, and where a failed call's status becomes
a domain error (:func:`tokenyard.common.errors.from_rpc_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common import tracing
from tokenyard.common.errors import Unavailable, from_rpc_error
from tokenyard.common.interceptors import outgoing_metadata
from tokenyard.common.tls import PLAINTEXT, Tls
from tokenyard.frontend.generation import (
    KvTransfer,
    Outcome,
    RouteDecision,
    TokenChunk,
    WorkerRequest,
)
from tokenyard.frontend.response_format import GuidedDecoding
from tokenyard.frontend.worker_mux import MuxStream, WorkerMux, token_chunk

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    # Long prompts travel as token ids; keep the same ceiling as the servers.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Generations can sit idle between tokens for a long time on a slow engine; keep the
    # connection alive through NATs without tripping the servers' ping policy (10 s minimum).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)

# The call metadata that names this client to the routers (the router's client_leases reads it).
CLIENT_METADATA_KEY = "tokenyard-client"

# How long a notification stream gathers notifications before it writes them.
NOTIFY_BATCH_SECONDS = 0.005
# After a break, the notification stream is reopened after this long, doubled after each call that
# broke soon after opening, up to the most: well within the router's release delay (10 s by
# default), after which it takes a client without a call for dead and releases its requests.
REOPEN_FIRST_SECONDS = 0.05
REOPEN_MAX_SECONDS = 2.0
# While a router stays unreachable, how often to say so again (the first failure is logged at once).
STILL_UNREACHABLE_LOG_SECONDS = 60.0

_OUTCOME = {
    Outcome.FINISHED: router_pb2.REQUEST_OUTCOME_FINISHED,
    Outcome.FAILED: router_pb2.REQUEST_OUTCOME_FAILED,
    Outcome.CANCELLED: router_pb2.REQUEST_OUTCOME_CANCELLED,
}
# "" is the pool of the workers that serve clients whole (aggregated and decode workers).
_POOLS = {
    "": router_pb2.WORKER_POOL_UNSPECIFIED,
    "aggregated": router_pb2.WORKER_POOL_AGGREGATED,
    "prefill": router_pb2.WORKER_POOL_PREFILL,
    "decode": router_pb2.WORKER_POOL_DECODE,
}


# A lifecycle notification: (request id, outcome or None for a first token, output tokens).
_Note = tuple[str, Outcome | None, int]


class _Router:
    """One router replica: its channel, its notification stream, and until when it counts as down
    after a failed call."""

    __slots__ = ("address", "channel", "down_until", "notes", "stub", "unreachable_since", "warned_at")

    def __init__(self, address: str, client: RouterClient) -> None:
        self.address = address
        # With mTLS, the handshake fails unless the replica holds a router certificate.
        self.channel = client.tls.channel(address, "router", CHANNEL_OPTIONS)
        self.stub: router_pb2_grpc.RouterServiceAsyncStub = router_pb2_grpc.RouterServiceStub(self.channel)
        self.down_until = 0.0
        # Since when calls to it fail as unreachable (None: it answered last), and when that was
        # last logged: one warning when it goes, a reminder a minute, one line when it is back.
        self.unreachable_since: float | None = None
        self.warned_at = 0.0
        self.notes = _NotificationStream(self, client)

    def answered(self) -> None:
        """A call to it succeeded."""
        if self.unreachable_since is not None:
            log.info(
                "router %s answers again after %.1fs unreachable",
                self.address,
                time.monotonic() - self.unreachable_since,
            )
            self.unreachable_since = None


class _NotificationStream:
    """The lifecycle notifications for one router, over one long-lived StreamNotifications call.

    A notification costs a few bytes on a call that is already open instead of a call of its own,
    and those that pile up while a write is in flight go out together in the next message. The
    call opens on the first route or notification and stays open: to the router an open call is
    what tells a live client from a crashed one, whose requests it releases once the client has had
    no call open for a while. So after a break the call is reopened at once (then with backoff)
    while requests this router routed are still running, even with nothing to send. Until the
    router acknowledges a notification it is kept; when the call breaks (the router died, restarted
    or shut down), or goes unacknowledged for ``notify_timeout``, every notification not
    acknowledged is sent again as a unary call with the usual failover, and so are new ones until
    the call is open again (``down_for`` at most). The router applies each notification at most
    once per request, so one it had already applied before the break costs nothing there.
    """

    __slots__ = (
        "_acked",
        "_backoff",
        "_call",
        "_client",
        "_closing",
        "_deadline",
        "_drained",
        "_opened_at",
        "_queue",
        "_reopen",
        "_task",
        "_unacked",
        "_wake",
        "retry_at",
        "router",
    )

    def __init__(self, router: _Router, client: RouterClient) -> None:
        self.router = router
        self._client = client
        # Not written yet / written on the current call and not acknowledged, in order.
        self._queue: list[_Note] = []
        self._unacked: deque[_Note] = deque()
        # Acknowledged count on the current call (the router counts from the call's start).
        self._acked = 0
        self._deadline: float | None = None
        self._call: grpc.aio.StreamStreamCall[Any, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        # Until when notifications go as unary calls instead (after a break; forever for a router
        # that does not know the streaming call).
        self.retry_at = 0.0
        # The pending reopen after a break, the delay it was given, and when the current call opened.
        self._reopen: asyncio.TimerHandle | None = None
        self._backoff = REOPEN_FIRST_SECONDS
        self._opened_at = 0.0
        self._closing = False

    def push(self, note: _Note) -> None:
        self._queue.append(note)
        self._drained.clear()
        if self._task is None:
            self._open()
        else:
            self._wake.set()

    def keep_open(self) -> None:
        """This router routed a request: have the call open, so that the router sees this client
        alive for as long as the request runs. After a break the pending reopen does it."""
        if self._task is None and self._reopen is None and self.retry_at != math.inf and not self._closing:
            self._open()

    def _open(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        if self.retry_at != math.inf:
            # The call is up again: notifications go on it rather than as unary calls.
            self.retry_at = 0.0
        loop = asyncio.get_running_loop()
        self._opened_at = loop.time()
        self._task = loop.create_task(self._run())

    def _reopen_due(self) -> None:
        self._reopen = None
        if self._task is not None or self.retry_at == math.inf or self._closing:
            return
        if self._client._routed_by(self.router.address):
            self._open()

    async def drain(self, timeout: float) -> bool:
        """Wait until every notification pushed so far was acknowledged or handed to a unary call."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)
        return self._drained.is_set()

    async def close(self, timeout: float) -> None:
        """End the call once everything was acknowledged; what was not is sent as unary calls."""
        self._closing = True
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        task = self._task
        if task is None:
            return
        call = self._call
        if await self.drain(timeout) and call is not None and not call.done():
            try:
                await call.done_writing()
            except Exception as exc:
                # The call ended meanwhile: grpc raises its internal ExecuteBatchError then.
                log.debug(
                    "notification stream to %s ended before its half-close: %r", self.router.address, exc
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def abandon(self) -> None:
        """The router left: stop using the call; unacknowledged notifications fail over."""
        if self._task is not None:
            self._task.cancel()
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        self.retry_at = math.inf

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._client._notify_timeout
        # No request iterator: _write writes with call.write(), which keeps batching under our control.
        call = self._call = self.router.stub.StreamNotifications(metadata=self._client.identity)  # type: ignore[call-arg]
        writer = loop.create_task(self._write(call))
        reader = loop.create_task(self._read(call))
        error: BaseException | None = None
        try:
            while True:
                done, _ = await asyncio.wait(
                    (writer, reader), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    task = done.pop()
                    error = asyncio.CancelledError() if task.cancelled() else task.exception()
                    break
                if self._deadline is not None and loop.time() > self._deadline:
                    error = TimeoutError(f"no acknowledgement in {timeout}s")
                    break
        finally:
            writer.cancel()
            reader.cancel()
            call.cancel()
            self._task = self._call = None
            self._deadline = None
            self._acked = 0
            notes = [*self._unacked, *self._queue]
            self._unacked.clear()
            self._queue.clear()
            self._drained.set()
            self._broken(notes, error)

    async def _write(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._client._notify_timeout
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            # Gather what the next moments bring into the same message: a write costs both ends far
            # more than a notification in it, and a few milliseconds are nothing to the load
            # prediction these steer.
            await asyncio.sleep(NOTIFY_BATCH_SECONDS)
            batch, self._queue = self._queue, []
            if not self._unacked:
                self._deadline = loop.time() + timeout
            self._unacked.extend(batch)
            await call.write(_notifications_pb(batch))

    async def _read(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._client._notify_timeout
        unacked = self._unacked
        async for reply in call:
            self.router.answered()
            for _ in range(reply.handled - self._acked):
                unacked.popleft()
            self._acked = reply.handled
            if unacked:
                self._deadline = loop.time() + timeout
            else:
                self._deadline = None
                if not self._queue:
                    self._drained.set()
        # The router ended the call (it is shutting down): whatever it did not acknowledge goes
        # through the unary path when _run winds up.

    def _broken(self, notes: list[_Note], error: BaseException | None) -> None:
        client = self._client
        now = time.monotonic()
        if isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNIMPLEMENTED:
            log.info("router %s has no notification stream; using unary notifications", self.router.address)
            self.retry_at = math.inf
        else:
            self.retry_at = max(self.retry_at, now + client._down_for)
            if isinstance(error, grpc.RpcError) and _unreachable(error):
                client._mark_down(self.router, error)
            elif notes:
                log.info(
                    "notification stream to router %s ended (%s); resending %d",
                    self.router.address,
                    error.code() if isinstance(error, grpc.RpcError) else error or "closed",
                    len(notes),
                )
        for note in notes:
            client._unary(note, self.router.address)
        if self.retry_at != math.inf and not self._closing and self._reopen is None:
            loop = asyncio.get_running_loop()
            # A call that broke soon after it opened (the router is down or refusing it) waits
            # longer before the next try; one that had been up starts over from the shortest wait.
            lived = loop.time() - self._opened_at
            self._backoff = (
                REOPEN_FIRST_SECONDS
                if lived >= REOPEN_MAX_SECONDS
                else min(2 * self._backoff, REOPEN_MAX_SECONDS)
            )
            self._reopen = loop.call_later(self._backoff, self._reopen_due)


def _notifications_pb(batch: list[_Note]) -> router_pb2.StreamNotificationsRequest:
    msg = router_pb2.StreamNotificationsRequest()
    add = msg.notifications.add
    for request_id, outcome, output_tokens in batch:
        if outcome is None:
            add().first_token.request_id = request_id
        else:
            add(
                finished=router_pb2.NotifyFinishedRequest(
                    request_id=request_id, outcome=_OUTCOME[outcome], output_tokens=output_tokens
                )
            )
    return msg


class RouterClient:
    """Talks to every router replica; the addresses come from settings or follow discovery.

    Requests go round-robin over the routers that answered last time. A router that cannot be
    reached (UNAVAILABLE other than "no worker", DEADLINE_EXCEEDED) is skipped for ``down_for``
    seconds, or until discovery announces it again, and the call moves on to the next one: replica
    sync keeps every router's load prediction and index equal, so any of them can route any
    request. Notifications go to the router that routed the request, or to another one when that
    one is gone (replica sync makes the request known there, and frees it everywhere).

    Notifications are sent from tasks of their own so that neither the token stream nor a
    cancelled request waits on them; :meth:`close` lets the pending ones finish.
    """

    def __init__(
        self,
        addresses: Sequence[str] = (),
        *,
        route_timeout: float = 30.0,
        notify_timeout: float = 5.0,
        down_for: float = 2.0,
        tls: Tls = PLAINTEXT,
    ) -> None:
        self.tls = tls
        # Who this client is to the routers, on every call: a router releases the requests of a
        # client whose notification stream ended and that stays silent (it crashed), and knows
        # this client again across reconnections by it.
        self.identity: tuple[tuple[str, str], ...] = ((CLIENT_METADATA_KEY, uuid.uuid4().hex),)
        self._routers: dict[str, _Router] = {}
        self._ring: list[_Router] = []
        self._next = 0
        # Which router routed each request in flight, for its notifications.
        self._owners: dict[str, str] = {}
        self._route_timeout = route_timeout
        self._notify_timeout = notify_timeout
        self._down_for = down_for
        self._pending: set[asyncio.Task[None]] = set()
        # First-token notifications in flight as unary calls, by request id.
        self._firsts: dict[str, asyncio.Task[None]] = {}
        self._retired: set[asyncio.Task[None]] = set()
        for address in addresses:
            self.add(address)

    @property
    def addresses(self) -> list[str]:
        return list(self._routers)

    def add(self, address: str) -> None:
        """A router (re)appeared: use it, and take it as up again if it was marked down."""
        router = self._routers.get(address)
        if router is not None:
            router.down_until = 0.0
            return
        router = self._routers[address] = _Router(address, self)
        self._ring.append(router)
        log.info("router %s added (%d in all)", address, len(self._ring))

    def remove(self, address: str) -> None:
        """A router left; calls in flight on it finish (or fail over) on their own."""
        router = self._routers.pop(address, None)
        if router is None:
            return
        self._ring.remove(router)
        router.notes.abandon()
        task = asyncio.get_running_loop().create_task(router.channel.close(grace=self._route_timeout))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        log.info("router %s removed (%d left)", address, len(self._ring))

    def _mark_down(self, router: _Router, exc: grpc.RpcError) -> None:
        now = time.monotonic()
        if router.unreachable_since is None:
            router.unreachable_since = router.warned_at = now
            log.warning("router %s unreachable (%s); trying the others", router.address, exc.code())
        elif now - router.warned_at >= STILL_UNREACHABLE_LOG_SECONDS:
            router.warned_at = now
            log.warning(
                "router %s still unreachable after %.0fs (%s)",
                router.address,
                now - router.unreachable_since,
                exc.code(),
            )
        router.down_until = now + self._down_for

    def _route_order(self) -> list[_Router]:
        """Every router once: the next ones round-robin among those up, then those marked down
        (better a try than an answer of "no router" while the only one is recovering)."""
        ring = self._ring
        n = len(ring)
        if n == 1:
            return [ring[0]]
        start = self._next % n if n else 0
        self._next = start + 1
        now = time.monotonic()
        rotated = ring[start:] + ring[:start]
        return [r for r in rotated if r.down_until <= now] + [r for r in rotated if r.down_until > now]

    def _notify_order(self, owner: str | None) -> list[_Router]:
        now = time.monotonic()
        first = self._routers.get(owner) if owner else None
        up = [r for r in self._ring if r.down_until <= now and r is not first]
        down = [r for r in self._ring if r.down_until > now and r is not first]
        if first is None:
            return up + down
        return [first, *up, *down] if first.down_until <= now else [*up, first, *down]

    async def route(
        self,
        *,
        request_id: str,
        model: str,
        block_hashes: Sequence[int],
        isl_tokens: int,
        priority: int = 0,
        allowed_worker_ids: Sequence[int] = (),
        pool: str = "",
        session_id: str = "",
        expected_output_tokens: int | None = None,
    ) -> RouteDecision:
        """Choose a worker of ``pool`` ("" the workers that serve clients whole, "prefill",
        "decode"); ``allowed_worker_ids`` (empty: any) narrows the choice."""
        routers = self._route_order()
        if not routers:
            raise Unavailable("no router is available")
        request = router_pb2.RouteRequest(
            request_id=request_id,
            model=model,
            pool=_POOLS[pool],
            block_hashes=block_hashes,
            isl_tokens=isl_tokens,
            hints=router_pb2.RouteHints(
                priority=priority,
                allowed_worker_ids=allowed_worker_ids,
                session_id=session_id,
                expected_output_tokens=expected_output_tokens,
            ),
        )
        metadata = (*outgoing_metadata(), *self.identity)
        # Routers that timed out may have recorded the request; they hear of its end only if no
        # other router takes it (a re-route elsewhere supersedes their record through replica sync).
        timed_out: list[_Router] = []
        for router in routers:
            try:
                reply = await router.stub.Route(request, timeout=self._route_timeout, metadata=metadata)
            except asyncio.CancelledError:
                # The router may have recorded the request before the caller went away; finishing
                # is idempotent there, so say it ended.
                for r in (*timed_out, router):
                    self._spawn(self._finished(request_id, Outcome.CANCELLED, 0, r.address))
                raise
            except grpc.RpcError as exc:
                if not _unreachable(exc):
                    raise from_rpc_error(exc) from None
                self._mark_down(router, exc)
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    timed_out.append(router)
                continue
            self._owners[request_id] = router.address
            router.answered()
            router.notes.keep_open()
            return RouteDecision(
                reply.worker_id,
                reply.dp_rank,
                reply.address,
                reply.cached_tokens,
                reply.overlap_blocks,
                reply.active_prefill_tokens,
                reply.active_decode_blocks,
                reply.total_kv_blocks,
                reply.max_num_batched_tokens,
            )
        for r in timed_out:
            self._spawn(self._finished(request_id, Outcome.FAILED, 0, r.address))
        # No router could be reached: the same answer to the client as no worker.
        raise Unavailable("the router is unavailable")

    def _routed_by(self, address: str) -> bool:
        """Whether a request that router routed is still running here (its end not yet notified)."""
        return address in self._owners.values()

    def notify_first_token(self, request_id: str) -> None:
        self._notify((request_id, None, 0), self._owners.get(request_id))

    def notify_finished(self, request_id: str, outcome: Outcome, output_tokens: int) -> None:
        self._notify((request_id, outcome, output_tokens), self._owners.pop(request_id, None))

    def _notify(self, note: _Note, owner: str | None) -> None:
        """To the owner's stream when it is up; otherwise to the first router of the failover order,
        as a unary call when its stream is resting after a break."""
        now = time.monotonic()
        router = self._routers.get(owner) if owner is not None else None
        if router is None or router.down_until > now:
            order = self._notify_order(owner)
            if not order:
                return
            router = order[0]
        if router.notes.retry_at <= now:
            router.notes.push(note)
        else:
            self._unary(note, router.address)

    def _unary(self, note: _Note, owner: str | None) -> None:
        """A notification as a call of its own; an end waits for its request's first token still
        in flight, so that the router sees them in order."""
        request_id, outcome, output_tokens = note
        if outcome is None:
            task = self._spawn(self._first_token(request_id, owner))
            self._firsts[request_id] = task
            task.add_done_callback(lambda _: self._firsts.pop(request_id, None))
        else:
            self._spawn(
                self._finished(request_id, outcome, output_tokens, owner, self._firsts.get(request_id))
            )

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _first_token(self, request_id: str, owner: str | None) -> None:
        request = router_pb2.NotifyFirstTokenRequest(request_id=request_id)

        async def send(stub: router_pb2_grpc.RouterServiceAsyncStub) -> None:
            await stub.NotifyFirstToken(request, timeout=self._notify_timeout, metadata=self.identity)

        # A lost first-token only overstates that request's prefill load until it finishes.
        await self._deliver("NotifyFirstToken", request_id, owner, send)

    async def _finished(
        self,
        request_id: str,
        outcome: Outcome,
        output_tokens: int,
        owner: str | None,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        if after is not None:
            await asyncio.wait((after,))
        request = router_pb2.NotifyFinishedRequest(
            request_id=request_id, outcome=_OUTCOME[outcome], output_tokens=output_tokens
        )

        async def send(stub: router_pb2_grpc.RouterServiceAsyncStub) -> None:
            await stub.NotifyFinished(request, timeout=self._notify_timeout, metadata=self.identity)

        await self._deliver("NotifyFinished", request_id, owner, send)

    async def _deliver(
        self,
        what: str,
        request_id: str,
        owner: str | None,
        send: Callable[[router_pb2_grpc.RouterServiceAsyncStub], Awaitable[None]],
    ) -> None:
        """Send to the owner, else to the others in turn. Both notifications apply at most once
        per request on every router, so a retry after a transport failure cannot free a request
        twice, and it keeps a dead or briefly unreachable router from leaking load."""
        routers = self._notify_order(owner)
        if not routers:
            return
        attempts = max(2, len(routers))
        for attempt in range(attempts):
            router = routers[attempt % len(routers)]
            try:
                await send(router.stub)
                router.answered()
                return
            except grpc.RpcError as exc:
                if attempt == attempts - 1 or not _unreachable(exc):
                    log.warning("%s %s failed: %s", what, request_id, exc.code())
                    return
                self._mark_down(router, exc)

    async def flush(self) -> None:
        """Wait until every notification sent so far was answered (or gave up)."""
        for router in list(self._ring):
            await router.notes.drain(self._notify_timeout)
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=2 * self._notify_timeout)

    async def close(self) -> None:
        for router in list(self._ring):
            await router.notes.close(self._notify_timeout)
        await self.flush()
        for task in list(self._retired):
            task.cancel()
        routers = list(self._ring)
        self._routers.clear()
        self._ring.clear()
        for router in routers:
            with contextlib.suppress(Exception):
                await router.channel.close(None)


def _unreachable(exc: grpc.RpcError) -> bool:
    """The router itself could not answer (as opposed to answering "no worker")."""
    code = exc.code() if hasattr(exc, "code") else None
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and "no worker" not in (
        exc.details() or ""
    )


class WorkerStream:
    """One Generate call: an async iterator of :class:`TokenChunk`; :meth:`cancel` aborts it on
    the worker (which frees the request's KV blocks)."""

    __slots__ = ("_call",)

    def __init__(
        self, call: grpc.aio.UnaryStreamCall[worker_pb2.GenerateRequest, worker_pb2.GenerateResponse]
    ) -> None:
        self._call = call

    def __aiter__(self) -> WorkerStream:
        return self

    async def __anext__(self) -> TokenChunk:
        # read() rather than the call's async iterator: one async-generator layer less per message.
        try:
            reply = await self._call.read()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        if not isinstance(reply, worker_pb2.GenerateResponse):
            # grpc.aio.EOF: the worker ended the stream.
            raise StopAsyncIteration
        return token_chunk(reply)

    def cancel(self) -> None:
        self._call.cancel()


class WorkerClients:
    """One channel per worker address, opened on first use and reused by every request.

    ``mux``: requests travel over one GenerateMux call per worker (:mod:`tokenyard.frontend.worker_mux`)
    rather than a Generate call each; while tracing is on they take Generate calls, whose metadata
    carries each request's trace context to the worker."""

    def __init__(self, tls: Tls = PLAINTEXT, *, mux: bool = True) -> None:
        self._tls = tls
        self._mux = mux
        self._muxes: dict[str, WorkerMux] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerServiceAsyncStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerServiceAsyncStub:
        stub = self._stubs.get(address)
        if stub is None:
            # With mTLS, a discovery record that is not a worker's fails the handshake here.
            channel = self._channels[address] = self._tls.channel(address, "worker", CHANNEL_OPTIONS)
            stub = self._stubs[address] = worker_pb2_grpc.WorkerServiceStub(channel)
        return stub

    def generate(self, address: str, request: WorkerRequest) -> WorkerStream | MuxStream:
        stop = request.stop
        s = request.sampling
        message = worker_pb2.GenerateRequest(
            request_id=request.request_id,
            model=request.model,
            token_ids=request.token_ids,
            sampling=worker_pb2.SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                min_p=s.min_p,
                seed=s.seed,
                repetition_penalty=s.repetition_penalty,
                frequency_penalty=s.frequency_penalty,
                presence_penalty=s.presence_penalty,
            ),
            stop=worker_pb2.StopConditions(
                max_tokens=stop.max_tokens,
                min_tokens=stop.min_tokens,
                stop_token_ids=stop.stop_token_ids,
                ignore_eos=stop.ignore_eos,
            ),
            priority=request.priority,
            dp_rank=request.dp_rank,
            lora_name=request.lora_name,
            cache_salt=request.cache_salt,
            guided_decoding=_guided_decoding(request.guided),
        )
        if request.prefill_only:
            message.disaggregation.prefill_only = True
        elif request.kv_transfer is not None:
            message.disaggregation.kv_transfer.CopyFrom(_kv_transfer_pb(request.kv_transfer))
        if self._mux and tracing.tracer() is None:
            mux = self._muxes.get(address)
            if mux is None:
                mux = self._muxes[address] = WorkerMux(
                    address, self._stub(address), lambda m, t: self._unary(address, m, t)
                )
            if mux.supported:
                return mux.open(message, request.timeout)
        return self._unary(address, message, request.timeout)

    def _unary(
        self, address: str, message: worker_pb2.GenerateRequest, timeout: float | None
    ) -> WorkerStream:
        call = self._stub(address).Generate(message, metadata=outgoing_metadata(), timeout=timeout)
        return WorkerStream(call)

    def forget(self, address: str, grace: float = 30.0) -> None:
        """The worker at ``address`` left: close its channel once its calls had ``grace`` seconds."""
        self._stubs.pop(address, None)
        # Its streams in flight end with the channel (or finish first).
        self._muxes.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:
            task = asyncio.get_running_loop().create_task(channel.close(grace=grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        muxes = list(self._muxes.values())
        self._muxes.clear()
        for mux in muxes:
            await mux.close()
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for task in list(self._closing):
            task.cancel()
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close(None)


_GUIDED_KINDS = {
    "json_object": worker_pb2.GUIDED_DECODING_KIND_JSON_OBJECT,
    "json_schema": worker_pb2.GUIDED_DECODING_KIND_JSON_SCHEMA,
}


def _guided_decoding(guided: GuidedDecoding | None) -> worker_pb2.GuidedDecoding | None:
    if guided is None:
        return None
    return worker_pb2.GuidedDecoding(kind=_GUIDED_KINDS[guided.kind], json_schema=guided.schema_json or "")


def _kv_transfer_pb(t: KvTransfer) -> worker_pb2.KvTransferParams:
    return worker_pb2.KvTransferParams(
        source_worker_id=t.source_worker_id,
        source_dp_rank=t.source_dp_rank,
        source_address=t.source_address,
        transfer_id=t.transfer_id,
        block_hashes=t.block_hashes,
        num_tokens=t.num_tokens,
        engine_params=t.engine_params,
    )
