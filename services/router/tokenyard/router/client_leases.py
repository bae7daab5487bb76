"""Which client (frontend) routed each active request, so that a client that is gone for good
stops counting as load.

A frontend sends its lifecycle notifications on one long-lived ``StreamNotifications`` call, and
keeps that call open while it has requests here (it reopens it at once after a break). When the
call ends (the frontend crashed or was killed: its connection closed or reset) and the client then
has no call open for ``release_after`` seconds, every request it routed and never finished is
released, as if it had been cancelled; without this they would count as load until they expire
(minutes). Only a new call calls the release off. Other signs of life (a Route, a unary
notification) put it off to ``release_after`` from then but do not cancel it: a frontend may send
a few of those just before it dies, and a live one reopens its call well within the delay. To the
server a vanished client's call ends like a half-close, so the two are treated alike: a frontend
stopping in order has finished (or cancelled) its requests and sent their notifications first, so
nothing of it is left to release. A call this router ends (its own shutdown) releases nothing.

A client is named by the ``tokenyard-client`` call metadata when it sends one, else by its
connection's peer address (Route and the notification stream of one frontend share a channel,
hence a connection).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CLIENT_KEY = "tokenyard-client"
# Seconds a client whose notification stream broke may take to show it is alive.
DEFAULT_RELEASE_AFTER = 10.0
# Routes between two sweeps of requests that ended without a notification (expired, migrated
# through another router): the table stays as large as what is active, not what was ever routed.
SWEEP_EVERY = 4096


def client_of(metadata: Iterable[tuple[str, str | bytes]] | None, peer: str) -> str:
    for key, value in metadata or ():
        if key == CLIENT_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            # A key, not a payload: bounded like the ids it stands beside.
            return "id:" + text[:128]
    return "peer:" + peer


@dataclass(slots=True)
class _Client:
    requests: set[str] = field(default_factory=set)
    streams: int = 0
    # Armed while no call of the client is open after one broke and requests of it are pending.
    release: asyncio.TimerHandle | None = None
    # Loop time of the last sign of life while armed: the release is due release_after after it.
    last_seen: float = 0.0


class ClientLeases:
    def __init__(
        self,
        release: Callable[[str], bool],
        is_active: Callable[[str], bool],
        release_after: float = DEFAULT_RELEASE_AFTER,
    ) -> None:
        """``release(request_id)`` ends one request (True if it was still active)."""
        self._release = release
        self._is_active = is_active
        self._until_sweep = SWEEP_EVERY
        self.release_after = release_after
        self._clients: dict[str, _Client] = {}
        self._owner: dict[str, str] = {}
        self.released = 0

    def routed(self, client: str, request_id: str) -> None:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client()
        else:
            self._alive(state)
        previous = self._owner.get(request_id)
        if previous is not None and previous != client and previous in self._clients:
            # A migration through another frontend: the request is that one's now.
            before = self._clients[previous]
            before.requests.discard(request_id)
            self._forget_if_empty(previous, before)
        self._owner[request_id] = client
        state.requests.add(request_id)
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self._sweep()

    def _sweep(self) -> None:
        self._until_sweep = SWEEP_EVERY
        for request_id in [r for r in self._owner if not self._is_active(r)]:
            self.finished(request_id)

    def finished(self, request_id: str) -> None:
        client = self._owner.pop(request_id, None)
        if client is None:
            return
        state = self._clients.get(client)
        if state is not None:
            state.requests.discard(request_id)
            self._forget_if_empty(client, state)

    def seen(self, client: str) -> None:
        """A sign of life (a unary call): a pending release is put off, not called off."""
        state = self._clients.get(client)
        if state is not None:
            self._alive(state)

    def stream_opened(self, client: str) -> None:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client()
        # An open call is the one proof of life that lasts: its end is what arms the release again.
        self._disarm(state)
        state.streams += 1

    def stream_closed(self, client: str, *, broken: bool) -> None:
        state = self._clients.get(client)
        if state is None:
            return
        state.streams -= 1
        if state.streams > 0 or not broken or not state.requests:
            self._forget_if_empty(client, state)
            return
        if state.release is None:
            loop = asyncio.get_running_loop()
            state.last_seen = loop.time()
            state.release = loop.call_at(state.last_seen + self.release_after, self._due, client)

    def open_streams(self) -> int:
        return sum(state.streams for state in self._clients.values())

    def pending(self, client: str) -> int:
        state = self._clients.get(client)
        return len(state.requests) if state is not None else 0

    def close(self) -> None:
        for state in self._clients.values():
            self._disarm(state)

    def _alive(self, state: _Client) -> None:
        # A timestamp rather than a new timer: Routes are the hot path, and _due reads it.
        if state.release is not None:
            state.last_seen = asyncio.get_running_loop().time()

    @staticmethod
    def _disarm(state: _Client) -> None:
        if state.release is not None:
            state.release.cancel()
            state.release = None

    def _forget_if_empty(self, client: str, state: _Client) -> None:
        if not state.requests and state.streams <= 0:
            # Nothing left to release: a pending release would only log.
            self._disarm(state)
            self._clients.pop(client, None)

    def _due(self, client: str) -> None:
        state = self._clients.get(client)
        if state is None or state.release is None:
            return
        loop = asyncio.get_running_loop()
        due = state.last_seen + self.release_after
        if due > loop.time():
            # A sign of life since the timer was set: silent for release_after from then on.
            state.release = loop.call_at(due, self._due, client)
            return
        del self._clients[client]
        count = 0
        for request_id in state.requests:
            if self._owner.get(request_id) == client:
                del self._owner[request_id]
                count += self._release(request_id)
        self.released += count
        log.warning(
            "client %s: notification stream broken and silent for %.0fs; released its %d active request(s)",
            client,
            self.release_after,
            count,
        )
