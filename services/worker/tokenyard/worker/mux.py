"""GenerateMux: many Generate streams over one call per frontend.

A Generate call per request costs both ends a call setup and a message per token step; over one
long-lived call, a step's tokens for every request of that frontend leave in one message. Each
stream runs as its own task over the same intake a Generate call uses, so admission, validation,
drain and cancellation are exactly a Generate call's. Its outputs go into a pending table, keyed
by stream, that the writer empties into one message once the previous write completed and at
most every ``FLUSH_INTERVAL_S``, except that a stream's first tokens, an error or a request done in
its first output leave at once (a first token waits for nothing); meanwhile the next steps' tokens
pile up per stream and leave together.

A stream's error is its chunk's status code and message (what a Generate call would have ended
with, mapped by the same :func:`~tokenyard.common.errors.status_of`); only a broken call fails
every stream, and the frontend takes that as a lost worker. Each stream logs under its request's
id (the open's ``log_request_id``), as a Generate call logs under its ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

import grpc

from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.common.errors import TokenyardError, status_of
from tokenyard.common.interceptors import loggable_id
from tokenyard.common.logs import request_id_var
from tokenyard.worker.engines.base import EngineRequest
from tokenyard.worker.intake import Intake, Output

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.002
"""The shortest time between two writes of a call, but for writes that carry a stream's first
tokens: an engine that steps faster (the mocker at speedup 0) has its steps' tokens merged
instead of a message per step; one that steps slower sees no delay."""


class MuxSession:
    """One GenerateMux call."""

    def __init__(
        self,
        intake: Intake,
        engine_request: Callable[[worker_pb2.GenerateRequest], EngineRequest],
        response: Callable[[Output], worker_pb2.GenerateResponse],
        flush_interval: float = FLUSH_INTERVAL_S,
    ) -> None:
        self._intake = intake
        self._engine_request = engine_request
        self._response = response
        self._streams: dict[int, asyncio.Task[None]] = {}
        self._tokens: dict[int, list[int]] = {}
        self._ends: dict[int, Output | tuple[grpc.StatusCode, str]] = {}
        self._wake = asyncio.Event()
        self._reading = True
        self._closing = False
        # A stream's first tokens are pending: write without waiting for the interval.
        self._urgent = False
        self._interval = flush_interval

    def close(self) -> None:
        """The worker shuts down: end the call once its streams ended (new opens are refused by
        the intake, as Generate calls are)."""
        self._closing = True
        self._wake.set()

    async def run(
        self, requests: AsyncIterator[worker_pb2.GenerateMuxRequest]
    ) -> AsyncGenerator[worker_pb2.GenerateMuxResponse, None]:
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(requests))
        wake = self._wake
        last = -math.inf
        try:
            while True:
                if not self._tokens and not self._ends:
                    if not self._streams and (self._closing or not self._reading):
                        return
                    wake.clear()
                    await wake.wait()
                    continue
                if not self._urgent:
                    # Tokens faster than one write per interval (an engine that steps faster than
                    # that) gather for the rest of it; a first token cuts the wait short.
                    rest = last + self._interval - loop.time()
                    if rest > 0:
                        wake.clear()
                        timer = loop.call_later(rest, wake.set)
                        await wake.wait()
                        timer.cancel()
                        continue
                self._urgent = False
                last = loop.time()
                yield self._batch()
        finally:
            reader.cancel()
            for task in list(self._streams.values()):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    def _batch(self) -> worker_pb2.GenerateMuxResponse:
        tokens, self._tokens = self._tokens, {}
        ends, self._ends = self._ends, {}
        message = worker_pb2.GenerateMuxResponse()
        add = message.chunks.add
        for stream_id, ids in tokens.items():
            if stream_id in ends:
                continue
            chunk = add(stream_id=stream_id)
            chunk.response.token_ids.extend(ids)
        for stream_id, end in ends.items():
            ids = tokens.get(stream_id, [])
            if isinstance(end, Output):
                out = end if not ids else Output((*ids, *end.token_ids), end.completion)
                add(stream_id=stream_id, response=self._response(out))
            else:
                if ids:
                    add(stream_id=stream_id).response.token_ids.extend(ids)
                add(stream_id=stream_id, error_code=end[0].value[0], error_message=end[1])
        return message

    async def _read(self, requests: AsyncIterator[worker_pb2.GenerateMuxRequest]) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for message in requests:
                for opened in message.open:
                    stream_id = opened.stream_id
                    if stream_id in self._streams:
                        # A client bug. Whatever this call carries under that id is read as the
                        # live stream's, so an error for the duplicate would end the live stream,
                        # and failing the call would end every stream on it: refuse the duplicate
                        # with no answer at all (its sender's own deadline ends its wait).
                        log.warning(
                            "GenerateMux: refused an open of stream %d (request %r): that stream is open",
                            stream_id,
                            opened.request.request_id,
                        )
                        continue
                    task = loop.create_task(self._serve(stream_id, opened))
                    self._streams[stream_id] = task
                for stream_id in message.cancel:
                    cancelled = self._streams.get(stream_id)
                    if cancelled is not None:
                        cancelled.cancel()
        except grpc.RpcError:
            pass
        finally:
            self._reading = False
            self._wake.set()

    async def _serve(self, stream_id: int, opened: worker_pb2.GenerateMuxOpen) -> None:
        end: Output | tuple[grpc.StatusCode, str] | None = None
        first = True
        # This task runs in a copy of the call's context: what it logs carries its own request's id.
        log_id = loggable_id(opened.log_request_id or opened.request.request_id)
        if log_id:
            request_id_var.set(log_id)
        try:
            request = self._engine_request(opened.request)
            timeout = opened.timeout_ms / 1000.0 if opened.timeout_ms > 0 else None
            async with asyncio.timeout(timeout):
                generate = self._intake.generate(opened.request.model, request)
                async with aclosing(generate) as outputs:
                    async for output in outputs:
                        if output.completion is not None:
                            end = output
                            break
                        pending = self._tokens.get(stream_id)
                        if pending is not None:
                            pending.extend(output.token_ids)
                            continue
                        if not self._tokens and not self._ends:
                            self._wake.set()
                        self._tokens[stream_id] = list(output.token_ids)
                        if first:
                            first = False
                            self._urgent = True
                            self._wake.set()
        except TimeoutError:
            end = (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        except asyncio.CancelledError:
            # The frontend cancelled the stream (or the call ended): nothing more to say.
            self._tokens.pop(stream_id, None)
            raise
        except Exception as exc:
            if not isinstance(exc, TokenyardError):
                log.exception("GenerateMux stream %d failed", stream_id)
            end = status_of(exc)
        finally:
            self._streams.pop(stream_id, None)
        if end is None:
            end = (grpc.StatusCode.UNAVAILABLE, "the engine ended the request without a result")
        # A request done in its first output (one token, an error) is all first tokens.
        self._end(stream_id, end, urgent=first or not isinstance(end, Output))

    def _end(self, stream_id: int, end: Output | tuple[grpc.StatusCode, str], *, urgent: bool = True) -> None:
        if urgent:
            self._urgent = True
            self._wake.set()
        elif not self._tokens and not self._ends:
            self._wake.set()
        self._ends[stream_id] = end
