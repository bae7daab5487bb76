"""The OpenAI HTTP listener: its own accept loop, a connection limit and per-connection timeouts.

asyncio's ``create_server`` is not used, for two reasons measured on a frontend run out of file
descriptors: its accept loop keeps calling ``accept()`` after EMFILE and logs a traceback for each
failure (tens of thousands of lines a second, about 80 MB in 10 s), and it has no limit on open
connections. Here:

* At most ``max_connections`` connections are served at once; one more is answered ``503`` with
  ``Connection: close`` and closed, so a client sees why, and descriptors are kept for the
  connections being served (and for the frontend's own gRPC channels).
* When ``accept()`` fails for lack of resources the listener pauses for a second; failures are
  counted and logged as one line per interval with the count, not a traceback per failure.
* A connection that sends nothing (or sits between requests) for ``idle_timeout`` is closed; a
  request whose head (request line and headers) takes longer than ``header_timeout`` from its
  first byte is answered ``408`` and closed (slowloris). The body has its own timeout, applied
  where it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

# Errors of accept() that mean "out of descriptors or memory": retry later, do not spin.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Seconds the listener pauses after such an error (asyncio's own choice).
ACCEPT_RETRY_SECONDS = 1.0
# Connections accepted per readiness event, so that a flood cannot starve the event loop.
ACCEPT_BATCH = 64
# Seconds a refused connection stays open after its 503, so that the client reads the answer
# instead of a reset caused by closing with its request unread; at most MAX_LINGERING at once,
# so that a flood of refusals cannot itself use up the descriptors (the rest close at once).
REFUSAL_LINGER_SECONDS = 0.5
MAX_LINGERING = 64
# Descriptors kept free for everything but client connections when the limit is derived from the
# process's descriptor limit (gRPC channels, discovery, logs, the KServe server's clients, refused
# connections lingering).
DESCRIPTOR_RESERVE = 256


def _canned(status: str, message: str) -> bytes:
    body = (
        '{"error":{"message":"'
        + message
        + '","type":"service_unavailable","param":null,"code":'
        + status.split()[0]
        + "}}"
    ).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


def raise_descriptor_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(setting: int) -> int:
    """``setting``, or (0) what this process's descriptor limit leaves for client connections."""
    if setting:
        return setting
    soft = raise_descriptor_limit()
    return max(16, soft - max(DESCRIPTOR_RESERVE, soft // 8))


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    max_connections: int
    header_timeout: float
    idle_timeout: float


class RateLimitedLog:
    """Counts an event and logs it at most once per ``interval`` seconds, with the count since the
    last line (the first occurrence is logged at once)."""

    def __init__(
        self, what: str, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.what = what
        self.interval = interval
        self._clock = clock
        self._last = -float("inf")
        self._pending = 0
        self.total = 0

    def note(self, detail: object) -> bool:
        """Count one occurrence; True when a line was logged."""
        self.total += 1
        self._pending += 1
        now = self._clock()
        if now - self._last < self.interval:
            return False
        log.warning(
            "%s: %d time(s) in the last %.0fs (%d in all); last: %s",
            self.what,
            self._pending,
            min(self.interval, now - self._last),
            self.total,
            detail,
        )
        self._last = now
        self._pending = 0
        return True


class _Refusal(asyncio.Protocol):
    """Answers one connection over the limit with a 503 and closes it."""

    def __init__(self, listener: GuardedListener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._listener.refusal_response)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSAL_LINGER_SECONDS, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.lingering -= 1

    def data_received(self, data: bytes) -> None:
        """The request is not read: its bytes are dropped until the connection closes."""

    def eof_received(self) -> bool:
        return False


class _Guarded(asyncio.Protocol):
    """One served connection: aiohttp's handler behind idle and header timers.

    Between requests the idle timer runs; the first byte of a request starts the header timer,
    which the request's handler stops when it begins (``request_started``)."""

    def __init__(self, listener: GuardedListener, inner: asyncio.Protocol) -> None:
        self._listener = listener
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._heading = False

    # -- timers -----------------------------------------------------------------------------

    def _arm(self, seconds: float, fire: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, fire) if seconds > 0 else None

    def _idle_expired(self) -> None:
        self._timer = None
        if self._transport is not None and not self._in_request and not self._transport.is_closing():
            self._listener.idle_closed += 1
            self._transport.close()

    def _head_expired(self) -> None:
        self._timer = None
        # (A head aiohttp could not parse was answered 400 and closed already.)
        if self._transport is not None and not self._in_request and not self._transport.is_closing():
            self._listener.header_timeouts += 1
            self._transport.write(self._listener.head_timeout_response)
            self._transport.close()

    def request_started(self) -> None:
        self._in_request = True
        self._heading = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_ended(self) -> None:
        self._in_request = False
        if self._transport is not None and not self._transport.is_closing():
            self._arm(self._listener.options.idle_timeout, self._idle_expired)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._listener.register(transport, self)
        self._arm(self._listener.options.idle_timeout, self._idle_expired)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._in_request and not self._heading:
            self._heading = True
            self._arm(self._listener.options.header_timeout, self._head_expired)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._listener.unregister(self._transport)
        self._inner.connection_lost(exc)


class GuardedListener:
    """Accepts on a bound, listening socket and hands connections to aiohttp's server."""

    def __init__(self, sock: socket.socket, options: ConnectionOptions) -> None:
        self.sock = sock
        self.options = options
        self._factory: Callable[[], Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: dict[asyncio.Transport, _Guarded] = {}
        # Counted when accepted, not when the connection is set up (a task later): a burst of
        # accepts must see the ones before it.
        self._admitted = 0
        self._retry: asyncio.TimerHandle | None = None
        self._reading = False
        self._pending: set[asyncio.Task[Any]] = set()
        self.accept_errors = RateLimitedLog("accepting an HTTP connection failed")
        self.refusals = RateLimitedLog("HTTP connections refused at the connection limit")
        self.refused = 0
        self.lingering = 0
        self.idle_closed = 0
        self.header_timeouts = 0
        self.refusal_response = _canned(
            "503 Service Unavailable",
            f"this server has its limit of {options.max_connections} connections open "
            "(--http-max-connections / TOKENYARD_FRONTEND_HTTP_MAX_CONNECTIONS); retry later",
        )
        self.head_timeout_response = _canned(
            "408 Request Timeout",
            f"the request head did not arrive within {options.header_timeout:g}s "
            "(--http-header-timeout / TOKENYARD_FRONTEND_HTTP_HEADER_TIMEOUT)",
        )

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def register(self, transport: asyncio.Transport, guard: _Guarded) -> None:
        self._open[transport] = guard

    def unregister(self, transport: asyncio.Transport) -> None:
        if self._open.pop(transport, None) is not None:
            self._admitted -= 1

    def guard_of(self, transport: asyncio.BaseTransport | None) -> _Guarded | None:
        return self._open.get(transport) if isinstance(transport, asyncio.Transport) else None

    # -- accepting ------------------------------------------------------------------------------

    def start(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._resume()

    def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        self._factory = None

    def _resume(self) -> None:
        self._retry = None
        if self._loop is not None and self._factory is not None and not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._accept)
            self._reading = True

    def _pause(self) -> None:
        assert self._loop is not None
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        if self._retry is None:
            self._retry = self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self.accept_errors.note(exc)
                if exc.errno in _RESOURCE_ERRNOS:
                    self._pause()
                return
            conn.setblocking(False)
            if self._admitted < self.options.max_connections:
                self._admitted += 1
                self._hand_over(conn, self._guarded, admitted=True)
                continue
            self.refused += 1
            self.refusals.note(f"{self._admitted} open")
            if self.lingering < MAX_LINGERING:
                self.lingering += 1
                self._hand_over(conn, lambda: _Refusal(self), refusal=True)
            else:
                # Too many refusals in flight: answer in passing and close now.
                with contextlib.suppress(OSError):
                    conn.send(self.refusal_response)
                conn.close()

    def _guarded(self) -> _Guarded:
        factory = self._factory
        assert factory is not None
        return _Guarded(self, factory())

    def _hand_over(
        self,
        conn: socket.socket,
        protocol: Callable[[], asyncio.Protocol],
        *,
        admitted: bool = False,
        refusal: bool = False,
    ) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._connect(conn, protocol, admitted, refusal))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _connect(
        self, conn: socket.socket, protocol: Callable[[], asyncio.Protocol], admitted: bool, refusal: bool
    ) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(protocol, sock=conn)
        except OSError as exc:
            conn.close()
            self.accept_errors.note(exc)
            # Never set up, so never lost: give back what _accept counted.
            if admitted:
                self._admitted -= 1
            if refusal:
                self.lingering -= 1


class GuardedSite(web.BaseSite):
    """An aiohttp site serving through a :class:`GuardedListener`."""

    __slots__ = ("_listener",)

    def __init__(self, runner: web.BaseRunner, listener: GuardedListener) -> None:
        super().__init__(runner)
        self._listener = listener

    @property
    def name(self) -> str:
        host, port = self._listener.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._listener.start(server)

    async def stop(self) -> None:
        self._listener.stop()
        await super().stop()
