"""The worker transport that carries every request to one worker over one GenerateMux call.

A Generate call per request costs the frontend a call setup and a message read per token step; one
GenerateMux call per worker carries a step's tokens for all of this frontend's requests there in
one message. :class:`WorkerMux` owns that call: a writer task sends opens and cancels (what
gathered while the previous write was in flight goes in one message, or in several of at most
``BATCH_BYTES`` each: long prompts would otherwise pass the message size limit together), a
reader task hands each chunk to its :class:`MuxStream`. A stream's tokens that arrived before its
consumer came back for them are handed out together, as one chunk; once the stream is cancelled,
nothing more is.

A stream's own error (the status a Generate call would have ended with) ends that stream only. A
broken call (the worker died, the connection dropped) ends every stream on it with UNAVAILABLE,
which the pipeline takes as a lost worker and migrates; the next request opens a new call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    TokenyardError,
    Unavailable,
    from_status,
)
from tokenyard.common.logs import request_id_var
from tokenyard.common.service import MAX_MESSAGE_BYTES
from tokenyard.frontend.generation import FinishReason, KvTransfer, TokenChunk, Usage

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_FINISH = {
    worker_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    worker_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    worker_pb2.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    worker_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
}
BATCH_BYTES = 8 * 1024 * 1024
"""The size past which the opens gathered for one write go in more than one message: many long
prompts in one message would pass the 64 MiB limit of both ends and fail the call, and with it
every stream on it."""
# An open this large cannot go in a message of its own either (the message's framing adds a few
# bytes): it fails alone, as the same request's Generate call would.
_MAX_OPEN_BYTES = MAX_MESSAGE_BYTES - 1024
# A stream whose worker says nothing this long past the request's deadline is given up here too
# (the worker enforces the deadline; this covers a worker that hangs).
_DEADLINE_SLACK_S = 1.0


class MuxStream:
    """One request's stream on a :class:`WorkerMux`: an async iterator of :class:`TokenChunk`;
    :meth:`cancel` aborts it on the worker."""

    __slots__ = ("_end", "_error", "_fallback", "_id", "_mux", "_open", "_timer", "_tokens", "_waiter")

    def __init__(self, mux: WorkerMux, stream_id: int, opened: worker_pb2.GenerateMuxOpen) -> None:
        self._mux = mux
        self._id = stream_id
        self._open = opened
        # The Generate call that took the request over from a worker without GenerateMux.
        self._fallback: TokenStream | None = None
        self._tokens: list[int] = []
        self._end: TokenChunk | None = None
        self._error: TokenyardError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __aiter__(self) -> MuxStream:
        return self

    async def __anext__(self) -> TokenChunk:
        while True:
            if self._fallback is not None:
                return await self._fallback.__anext__()
            end = self._end
            if end is not None:
                self._end = None
                self._error = _DONE
                if self._tokens:
                    end.token_ids = (*self._tokens, *end.token_ids)
                    self._tokens = []
                return end
            tokens = self._tokens
            if tokens:
                self._tokens = []
                return TokenChunk(tokens)
            error = self._error
            if error is not None:
                if error is _DONE:
                    raise StopAsyncIteration
                self._error = _DONE
                raise error
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def cancel(self) -> None:
        """Abort the request; the stream ends here and then, whatever the worker had sent already
        (tokens, its end) and whatever it still sends: the consumer gave the request up."""
        if self._fallback is not None:
            self._fallback.cancel()
        else:
            if self._error is None and self._end is None:
                self._mux.cancel(self._id)
            self._tokens = []
            self._end = None
            self._error = _DONE
            self._wake()
        self._stop_timer()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver(self, chunk: worker_pb2.GenerateMuxChunk) -> bool:
        """Take one chunk; True when it ended the stream."""
        if self._error is not None:
            return True
        if chunk.error_code:
            self._error = from_status(
                _CODES.get(chunk.error_code, grpc.StatusCode.UNKNOWN), chunk.error_message
            )
            self._stop_timer()
            self._wake()
            return True
        reply = chunk.response
        if reply.finish_reason == worker_pb2.FINISH_REASON_UNSPECIFIED:
            self._tokens.extend(reply.token_ids)
            self._wake()
            return False
        self._end = token_chunk(reply)
        self._stop_timer()
        self._wake()
        return True

    def _take_over(self, fallback: Fallback) -> None:
        """The worker has no GenerateMux: the request goes as a Generate call instead (the worker
        never saw it)."""
        opened = self._open
        timeout = opened.timeout_ms / 1000.0 if opened.timeout_ms else None
        self._fallback = fallback(opened.request, timeout)
        self._stop_timer()
        self._wake()

    def _fail(self, error: TokenyardError) -> None:
        if self._error is None and self._end is None:
            self._error = error
        self._stop_timer()
        self._wake()

    def _expire(self) -> None:
        self._timer = None
        if self._error is None and self._end is None:
            self._mux.cancel(self._id)
            self._fail(DeadlineExceeded("Deadline Exceeded"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# The marker of a stream that ended: nothing more to hand out.
_DONE = TokenyardError("the stream ended")


class TokenStream(Protocol):
    """A Generate call as the pipeline reads it (:class:`tokenyard.frontend.clients.WorkerStream`)."""

    async def __anext__(self) -> TokenChunk: ...

    def cancel(self) -> None: ...


# Opens a Generate call for a request the worker could not take over GenerateMux.
Fallback = Callable[[worker_pb2.GenerateRequest, float | None], TokenStream]


class WorkerMux:
    """The GenerateMux call to one worker, opened on first use and again after it broke.

    ``fallback``: how a request goes to a worker that answers UNIMPLEMENTED (one without
    GenerateMux, as a test double serving Generate alone); those requests, and every later one,
    take Generate calls. Without it, they fail as UNAVAILABLE."""

    def __init__(
        self, address: str, stub: worker_pb2_grpc.WorkerServiceAsyncStub, fallback: Fallback | None = None
    ) -> None:
        self.address = address
        self._stub = stub
        self._fallback = fallback
        self._streams: dict[int, MuxStream] = {}
        self._next_id = 0
        self._opens: list[worker_pb2.GenerateMuxOpen] = []
        self._cancels: list[int] = []
        self._wake = asyncio.Event()
        self._call: grpc.aio.StreamStreamCall[Any, Any] | None = None
        self._tasks: tuple[asyncio.Task[None], ...] = ()
        # False once the worker answered UNIMPLEMENTED (a worker without GenerateMux).
        self.supported = True

    def open(self, request: worker_pb2.GenerateRequest, timeout: float | None) -> MuxStream:
        if self._call is None:
            self._start()
        self._next_id += 1
        stream_id = self._next_id
        # The worker logs the stream under the id this request logs under here (a Generate call
        # carries it as x-request-id metadata; this call's metadata is no one request's).
        log_id = request_id_var.get()
        opened = worker_pb2.GenerateMuxOpen(
            stream_id=stream_id,
            request=request,
            timeout_ms=timeout * 1000.0 if timeout else 0.0,
            log_request_id=log_id if log_id != "-" else "",
        )
        stream = MuxStream(self, stream_id, opened)
        self._streams[stream_id] = stream
        self._opens.append(opened)
        if timeout:
            stream._timer = asyncio.get_running_loop().call_later(timeout + _DEADLINE_SLACK_S, stream._expire)
        self._wake.set()
        return stream

    def cancel(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._cancels.append(stream_id)
            self._wake.set()

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        # No request iterator: the writer writes with call.write() and batches what gathered.
        call = self._call = self._stub.GenerateMux()  # type: ignore[call-arg]
        self._tasks = (loop.create_task(self._write(call)), loop.create_task(self._read(call)))

    async def _write(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        wake = self._wake
        try:
            while True:
                if not self._opens and not self._cancels:
                    wake.clear()
                    await wake.wait()
                    # The other requests this turn of the event loop opens go in the same write:
                    # a write costs more than many opens in it.
                    await asyncio.sleep(0)
                    continue
                for message in self._messages():
                    await call.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            # The reader sees the call's end and fails the streams.
            log.debug("GenerateMux to %s: write failed: %s", self.address, exc)

    def _messages(self) -> list[worker_pb2.GenerateMuxRequest]:
        """What gathered for the next write, in messages of at most ``BATCH_BYTES`` (but for one
        open that is larger alone)."""
        opens, cancels = self._opens, self._cancels
        self._opens, self._cancels = [], []
        messages: list[worker_pb2.GenerateMuxRequest] = []
        message = worker_pb2.GenerateMuxRequest()
        size = 0
        for opened in opens:
            # The field's tag and length prefix: at most 6 bytes for an open under 2 GiB.
            n = opened.ByteSize() + 6
            if n > _MAX_OPEN_BYTES:
                self._refuse(opened.stream_id, n)
                continue
            if message.open and size + n > BATCH_BYTES:
                messages.append(message)
                message = worker_pb2.GenerateMuxRequest()
                size = 0
            message.open.append(opened)
            size += n
        # Cancels go last: one may be of a stream opened in this very batch, and the worker
        # ignores a cancel of a stream it has not seen opened.
        message.cancel.extend(cancels)
        messages.append(message)
        return messages

    def _refuse(self, stream_id: int, size: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream._fail(
                InvalidArgument(
                    f"the request is {size} bytes, more than the {MAX_MESSAGE_BYTES} a message may carry"
                )
            )

    async def _read(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        streams = self._streams
        error: TokenyardError = Unavailable(f"the stream to worker {self.address} was closed")
        try:
            while True:
                message = await call.read()
                if not isinstance(message, worker_pb2.GenerateMuxResponse):
                    error = Unavailable(f"worker {self.address} ended its stream")
                    break
                for chunk in message.chunks:
                    stream = streams.get(chunk.stream_id)
                    if stream is not None and stream._deliver(chunk):
                        del streams[chunk.stream_id]
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("worker %s has no GenerateMux; using Generate calls", self.address)
                self.supported = False
                if self._fallback is not None:
                    self._hand_over(call, self._fallback)
            error = Unavailable(f"worker {self.address} stream broke: {exc.code().name}: {exc.details()}")
        except Exception as exc:
            # Whatever broke the reader, no stream of the call may wait for it forever.
            log.exception("GenerateMux to %s: reading failed", self.address)
            error = Unavailable(f"the stream to worker {self.address} failed: {type(exc).__name__}")
        finally:
            self._broken(call, error)

    def _broken(self, call: grpc.aio.StreamStreamCall[Any, Any], error: TokenyardError) -> None:
        if self._call is call:
            self._call = None
            for task in self._tasks:
                task.cancel()
            self._tasks = ()
            call.cancel()
            streams, self._streams = self._streams, {}
            self._opens, self._cancels = [], []
            for stream in streams.values():
                stream._fail(error)

    def _hand_over(self, call: grpc.aio.StreamStreamCall[Any, Any], fallback: Fallback) -> None:
        if self._call is not call:
            return
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._take_over(fallback)

    async def close(self) -> None:
        call, tasks = self._call, self._tasks
        if call is None:
            return
        self._broken(call, Unavailable(f"the stream to worker {self.address} was closed"))
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def token_chunk(reply: worker_pb2.GenerateResponse) -> TokenChunk:
    """A worker's reply (of a Generate call or a GenerateMux stream) as the pipeline reads it."""
    if reply.finish_reason == worker_pb2.FINISH_REASON_UNSPECIFIED:
        return TokenChunk(reply.token_ids)
    usage = reply.usage
    return TokenChunk(
        # A copy: the ids would otherwise keep the whole message they came in alive.
        tuple(reply.token_ids),
        _FINISH[reply.finish_reason],
        Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
        kv_transfer_of(reply.kv_transfer) if reply.HasField("kv_transfer") else None,
    )


def kv_transfer_of(t: worker_pb2.KvTransferParams) -> KvTransfer:
    return KvTransfer(
        source_worker_id=t.source_worker_id,
        source_dp_rank=t.source_dp_rank,
        source_address=t.source_address,
        transfer_id=t.transfer_id,
        block_hashes=tuple(t.block_hashes),
        num_tokens=t.num_tokens,
        engine_params=t.engine_params,
    )
