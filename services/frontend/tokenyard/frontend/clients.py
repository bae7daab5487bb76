"""Outbound calls: the router (Route and lifecycle notifications) and the workers (Generate).

This is the edge where the router's and worker's protobufs are translated to and from the
domain types of :mod:`tokenyard.frontend.generation`, and where a failed call's status becomes
a domain error (:func:`tokenyard.common.errors.from_rpc_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from tokenyard.common.errors import TokenyardError, Unavailable, from_rpc_error
from tokenyard.common.interceptors import outgoing_metadata
from tokenyard.frontend.generation import (
    FinishReason,
    Outcome,
    RouteDecision,
    TokenChunk,
    Usage,
    WorkerRequest,
)
from tokenyard.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.worker.v1 import worker_pb2, worker_pb2_grpc

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

_FINISH = {
    worker_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    worker_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    worker_pb2.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    worker_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_OUTCOME = {
    Outcome.FINISHED: router_pb2.REQUEST_OUTCOME_FINISHED,
    Outcome.FAILED: router_pb2.REQUEST_OUTCOME_FAILED,
    Outcome.CANCELLED: router_pb2.REQUEST_OUTCOME_CANCELLED,
}


def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


class RouterClient:
    """Talks to one router; the address comes from settings or follows discovery.

    Notifications are sent from tasks of their own so that neither the token stream nor a
    cancelled request waits on them; :meth:`close` lets the pending ones finish.
    """

    def __init__(
        self, address: str = "", *, route_timeout: float = 30.0, notify_timeout: float = 5.0
    ) -> None:
        self._address = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: router_pb2_grpc.RouterServiceAsyncStub | None = None
        self._route_timeout = route_timeout
        self._notify_timeout = notify_timeout
        self._pending: set[asyncio.Task[None]] = set()
        self._retired: set[asyncio.Task[None]] = set()
        if address:
            self.set_address(address)

    @property
    def address(self) -> str:
        return self._address

    def set_address(self, address: str) -> None:
        """Switch to another router (or to none with ``""``); calls in flight finish on the old one."""
        if address == self._address:
            return
        old = self._channel
        self._address = address
        self._channel = _channel(address) if address else None
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel) if self._channel is not None else None
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close(grace=self._route_timeout))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        log.info("router: %s", address or "none")

    def _require(self) -> router_pb2_grpc.RouterServiceAsyncStub:
        if self._stub is None:
            raise Unavailable("no router is available")
        return self._stub

    async def route(
        self, *, request_id: str, model: str, block_hashes: Sequence[int], isl_tokens: int, priority: int = 0
    ) -> RouteDecision:
        stub = self._require()
        request = router_pb2.RouteRequest(
            request_id=request_id,
            model=model,
            block_hashes=block_hashes,
            isl_tokens=isl_tokens,
            hints=router_pb2.RouteHints(priority=priority),
        )
        try:
            reply = await stub.Route(request, timeout=self._route_timeout, metadata=outgoing_metadata())
        except asyncio.CancelledError:
            # The router may have recorded the request before the caller went away; finishing
            # is idempotent there, so say it ended.
            self.notify_finished(request_id, Outcome.CANCELLED, 0)
            raise
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.notify_finished(request_id, Outcome.FAILED, 0)
            raise _router_error(exc) from None
        return RouteDecision(reply.worker_id, reply.dp_rank, reply.address, reply.cached_tokens)

    def notify_first_token(self, request_id: str) -> None:
        self._spawn(self._first_token(request_id))

    def notify_finished(self, request_id: str, outcome: Outcome, output_tokens: int) -> None:
        self._spawn(self._finished(request_id, outcome, output_tokens))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _first_token(self, request_id: str) -> None:
        if self._stub is None:
            return
        try:
            await self._stub.NotifyFirstToken(
                router_pb2.NotifyFirstTokenRequest(request_id=request_id), timeout=self._notify_timeout
            )
        except grpc.RpcError as exc:
            # The router forgets unnotified requests after its expiry; a lost first-token only
            # overstates that request's prefill load until it finishes.
            log.warning("NotifyFirstToken %s failed: %s", request_id, exc.code())

    async def _finished(self, request_id: str, outcome: Outcome, output_tokens: int) -> None:
        if self._stub is None:
            return
        request = router_pb2.NotifyFinishedRequest(
            request_id=request_id, outcome=_OUTCOME[outcome], output_tokens=output_tokens
        )
        # Finishing is idempotent on the router, so one retry after a transport failure cannot
        # free a request twice, and it keeps a brief router hiccup from leaking load.
        for attempt in (1, 2):
            try:
                await self._stub.NotifyFinished(request, timeout=self._notify_timeout)
                return
            except grpc.RpcError as exc:
                if attempt == 2 or exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    log.warning("NotifyFinished %s failed: %s", request_id, exc.code())
                    return

    async def flush(self) -> None:
        """Wait until every notification sent so far was answered (or gave up)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=2 * self._notify_timeout)

    async def close(self) -> None:
        await self.flush()
        for task in list(self._retired):
            task.cancel()
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
            self._stub = None


def _router_error(exc: grpc.RpcError) -> TokenyardError:
    code = exc.code() if hasattr(exc, "code") else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and "no worker" not in (
        exc.details() or ""
    ):
        # The router itself could not be reached: the same answer to the client as no worker.
        return Unavailable("the router is unavailable")
    return from_rpc_error(exc)


class WorkerStream:
    """One Generate call: an async iterator of :class:`TokenChunk`; :meth:`cancel` aborts it on
    the worker (which frees the request's KV blocks)."""

    __slots__ = ("_call", "_replies")

    def __init__(
        self, call: grpc.aio.UnaryStreamCall[worker_pb2.GenerateRequest, worker_pb2.GenerateResponse]
    ) -> None:
        self._call = call
        self._replies = call.__aiter__()

    def __aiter__(self) -> WorkerStream:
        return self

    async def __anext__(self) -> TokenChunk:
        try:
            reply = await self._replies.__anext__()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        if reply.finish_reason == worker_pb2.FINISH_REASON_UNSPECIFIED:
            return TokenChunk(reply.token_ids)
        usage = reply.usage
        return TokenChunk(
            reply.token_ids,
            _FINISH[reply.finish_reason],
            Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
        )

    def cancel(self) -> None:
        self._call.cancel()


class WorkerClients:
    """One channel per worker address, opened on first use and reused by every request."""

    def __init__(self) -> None:
        self._stubs: dict[str, worker_pb2_grpc.WorkerServiceAsyncStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerServiceAsyncStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = self._channels[address] = _channel(address)
            stub = self._stubs[address] = worker_pb2_grpc.WorkerServiceStub(channel)
        return stub

    def generate(self, address: str, request: WorkerRequest) -> WorkerStream:
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
        )
        call = self._stub(address).Generate(message, metadata=outgoing_metadata())
        return WorkerStream(call)

    def forget(self, address: str, grace: float = 30.0) -> None:
        """The worker at ``address`` left: close its channel once its calls had ``grace`` seconds."""
        self._stubs.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:
            task = asyncio.get_running_loop().create_task(channel.close(grace=grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for task in list(self._closing):
            task.cancel()
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close(None)
