"""The guard that tells the router about a request's first token and end, once each, whatever happens.

A request can end in many places: the worker finishes it, a stop string cuts it short, the worker
or the transport fails, the client disconnects, the server shuts down. Every one of those paths
calls :meth:`RequestLifecycle.finish`; only the first call reaches the router, so the router's
load accounting neither leaks (no notification) nor double-frees (two).
"""

from __future__ import annotations

from typing import Protocol

from tokenyard.frontend.generation import Outcome


class LifecycleSink(Protocol):
    """Where notifications go (the router client); both calls return at once."""

    def notify_first_token(self, request_id: str) -> None: ...

    def notify_finished(self, request_id: str, outcome: Outcome, output_tokens: int) -> None: ...


class RequestLifecycle:
    __slots__ = ("_first_sent", "_sink", "outcome", "request_id")

    def __init__(self, sink: LifecycleSink, request_id: str) -> None:
        self._sink = sink
        self.request_id = request_id
        self._first_sent = False
        self.outcome: Outcome | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def first_token(self) -> None:
        if self._first_sent or self.outcome is not None:
            return
        self._first_sent = True
        self._sink.notify_first_token(self.request_id)

    def rerouted(self) -> None:
        """The request was routed again (a migration): the router tracks it afresh, so the first
        token of the new assignment is news to it."""
        self._first_sent = False

    def finish(self, outcome: Outcome, output_tokens: int) -> bool:
        """Report the end; False (and nothing sent) when it was already reported."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self._sink.notify_finished(self.request_id, outcome, output_tokens)
        return True
