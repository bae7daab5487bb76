"""What a worker admits, what it has in flight, and how it drains.

Admission order: availability first (not started, draining, shutting down: UNAVAILABLE, so the
caller can migrate the request elsewhere), then the request itself (INVALID_ARGUMENT / NOT_FOUND),
then the in-flight limit (RESOURCE_EXHAUSTED).

Disaggregated decode: a request carrying ``kv_transfer`` on a worker whose engine holds KV bytes
(:class:`~tokenyard.worker.engines.base.KvBlockTransfer`) first pulls the prompt's blocks from the
prefill worker (:mod:`tokenyard.worker.kv_fetch`; only those this engine does not hold already),
imports them, then generates. If the pull fails for any reason (source gone, transfer expired,
layout mismatch, deadline, a broken stream) the worker logs it once, counts it by reason, and
computes the prompt itself: the request is never lost to a transfer. The fetch counts as in flight
(a drain waits for it) and cancelling the request cancels the fetch. An engine without KV bytes
(the mocker) takes the transferred prompt as computed, with nothing to fetch.

A drain stops admission, runs the drain hooks (the server's: NOT_SERVING and deregistration), and
lets in-flight requests finish; past the grace period the worker aborts those still running, and
their streams end with ``cancelled``. The process keeps running afterwards (it still answers
Describe, GetLoad and its event streams) until it is told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace

from tokenyard.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Overloaded,
    TokenyardError,
    Unavailable,
)
from tokenyard.worker.engines.base import (
    Engine,
    EngineInfo,
    EngineRequest,
    FinishReason,
    GuidedDecoder,
    GuidedDecoding,
    GuidedKind,
    KvBlockTransfer,
    KvTransferParams,
    Usage,
)
from tokenyard.worker.kv_fetch import FetchFailed, KvFetcher
from tokenyard.worker.metrics import WorkerMetrics
from tokenyard.worker.request_bounds import check_request_bounds

log = logging.getLogger(__name__)

DrainHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds from the moment the worker received the request."""

    queued_s: float | None
    """Until the engine first scheduled it; None when the engine does not report it."""
    first_token_s: float | None
    """None if the request ended before producing a token."""
    total_s: float


@dataclass(frozen=True, slots=True)
class Completion:
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    kv_transfer: KvTransferParams | None = None


@dataclass(frozen=True, slots=True)
class Output:
    """New tokens since the previous output; the last output carries the completion."""

    token_ids: tuple[int, ...]
    completion: Completion | None = None


@dataclass(frozen=True, slots=True)
class DrainResult:
    in_flight_requests: int
    """Requests in flight when the drain began."""
    cancelled_requests: int
    """Requests aborted because the grace period ran out (known once the drain finished)."""
    already_draining: bool


@dataclass(slots=True)
class _Drain:
    in_flight: int
    task: asyncio.Task[None] | None = None
    cancelled: int = 0


def refuse_unguidable(guided: GuidedDecoding | None, kind: str, supported: tuple[GuidedKind, ...]) -> None:
    """Raise InvalidArgument when an engine of ``kind`` cannot honour ``guided``: an engine never
    ignores a constraint it was asked for."""
    if guided is None or guided.kind in supported:
        return
    can = ", ".join(k.value for k in supported) if supported else "no guided decoding at all"
    raise InvalidArgument(
        f"guided_decoding: the {kind} engine cannot constrain its output to {guided.kind.value} "
        f"(it supports {can})"
    )


def _check_range(name: str, value: float | None, low: float, high: float, *, low_open: bool = False) -> None:
    if value is None:
        return
    if math.isnan(value) or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidArgument(f"sampling.{name} must be in {bracket}{low:g}, {high:g}], got {value:g}")


_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")


def validate_transfer(request: EngineRequest, block_size: int, *, needs_source: bool) -> None:
    """Raise InvalidArgument for transfer parameters that cannot describe a prefix of the prompt
    (the prefill worker made them for this very prompt: they cover at most all of it, in complete
    blocks plus a partial one). ``needs_source``: this worker will fetch from ``source_address``."""
    t = request.kv_transfer
    if t is None:
        return
    where = "disaggregation.kv_transfer"
    if request.prefill_only:
        raise InvalidArgument(
            "disaggregation.prefill_only and disaggregation.kv_transfer are exclusive: a request either "
            "computes a prompt for a decode worker or continues one computed by a prefill worker"
        )
    if not t.transfer_id:
        raise InvalidArgument(f"{where}.transfer_id must be set (copy the prefill worker's kv_transfer)")
    n = len(request.token_ids)
    if t.num_tokens > n:
        raise InvalidArgument(
            f"{where}.num_tokens is {t.num_tokens}, more than the prompt's {n} tokens: the transfer "
            "must cover a prefix of this prompt"
        )
    full = t.num_tokens // block_size
    if len(t.block_hashes) > full:
        raise InvalidArgument(
            f"{where} names {len(t.block_hashes)} blocks, but its {t.num_tokens} tokens make at most "
            f"{full} complete blocks of {block_size}"
        )
    if needs_source:
        m = _ADDRESS.match(t.source_address)
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise InvalidArgument(
                f"{where}.source_address must be the prefill worker's host:port, got {t.source_address!r}"
            )


def validate(
    request: EngineRequest,
    model: str,
    served_model: str,
    info: EngineInfo,
    guided_kinds: tuple[GuidedKind, ...] = (),
    *,
    pulls_kv: bool = False,
) -> None:
    """Raise InvalidArgument or NotFound for a request this worker can never serve. ``pulls_kv``:
    the engine imports real KV bytes, so transfer parameters must say where to fetch them."""
    if not request.request_id:
        raise InvalidArgument("request_id must be set")
    if not model:
        raise InvalidArgument(f"model must be set (this worker serves {served_model!r})")
    if model != served_model:
        raise NotFound(f"model {model!r} is not served by this worker (it serves {served_model!r})")
    n = len(request.token_ids)
    if n == 0:
        raise InvalidArgument("token_ids must not be empty: the prompt needs at least one token")
    if request.max_tokens is not None and request.max_tokens < 1:
        raise InvalidArgument("stop.max_tokens must be at least 1 when set")
    if n >= info.context_length:
        raise InvalidArgument(
            f"prompt of {n} tokens does not fit the context length of {info.context_length} tokens "
            "(prompt plus at least one output token)"
        )
    check_request_bounds(request, info.context_length)
    if request.dp_rank is not None and not 0 <= request.dp_rank < info.dp_size:
        raise InvalidArgument(
            f"dp_rank {request.dp_rank} out of range: this worker has ranks 0..{info.dp_size - 1}"
        )
    refuse_unguidable(request.guided, info.kind, guided_kinds)
    validate_transfer(request, info.block_size, needs_source=pulls_kv)
    s = request.sampling
    _check_range("temperature", s.temperature, 0.0, math.inf)
    _check_range("top_p", s.top_p, 0.0, 1.0, low_open=True)
    _check_range("min_p", s.min_p, 0.0, 1.0)
    _check_range("repetition_penalty", s.repetition_penalty, 0.0, math.inf, low_open=True)
    _check_range("frequency_penalty", s.frequency_penalty, -2.0, 2.0)
    _check_range("presence_penalty", s.presence_penalty, -2.0, 2.0)


class Intake:
    def __init__(
        self,
        engine: Engine,
        info: EngineInfo,
        *,
        model: str,
        max_in_flight: int = 0,
        metrics: WorkerMetrics | None = None,
        fetcher: KvFetcher | None = None,
    ) -> None:
        """``fetcher``: how a decode request's KV is pulled; None: this worker never pulls (requests
        with transfer parameters are computed here, unless the engine simulates the transfer)."""
        self._engine = engine
        self._info = info
        self._transfer = engine if isinstance(engine, KvBlockTransfer) and fetcher is not None else None
        self._fetcher = fetcher
        self._guided_kinds = engine.guided_kinds() if isinstance(engine, GuidedDecoder) else ()
        self._model = model
        self._max_in_flight = max_in_flight
        self._metrics = metrics
        self._refusal: str | None = "starting: the engine is not serving yet"
        self._active: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain: _Drain | None = None
        self._drain_hooks: list[DrainHook] = []
        self._worker_id = 0
        self._address = ""

    # -- state ------------------------------------------------------------------------------

    def open(self, worker_id: int, address: str) -> None:
        """Start admitting; ``worker_id`` and ``address`` go into KV transfer parameters."""
        self._worker_id = worker_id
        self._address = address
        if self._drain is None:
            self._refusal = None

    def close(self) -> None:
        """Refuse every later request (shutdown); in-flight ones carry on."""
        self._refusal = "shutting down"

    def on_drain(self, hook: DrainHook) -> None:
        self._drain_hooks.append(hook)

    @property
    def draining(self) -> bool:
        return self._drain is not None

    @property
    def in_flight(self) -> int:
        return len(self._active)

    # -- requests ---------------------------------------------------------------------------

    def _admit(self, model: str, request: EngineRequest) -> None:
        if self._refusal is not None:
            raise Unavailable(f"worker is {self._refusal}")
        validate(
            request, model, self._model, self._info, self._guided_kinds, pulls_kv=self._transfer is not None
        )
        if request.request_id in self._active:
            raise AlreadyExists(f"request {request.request_id!r} is already running on this worker")
        if self._max_in_flight and len(self._active) >= self._max_in_flight:
            raise Overloaded(f"worker is at its limit of {self._max_in_flight} requests in flight")

    async def generate(self, model: str, request: EngineRequest) -> AsyncGenerator[Output, None]:
        """Stream a request's outputs. Closing the iterator or cancelling its consumer aborts the
        request in the engine, which frees its KV blocks."""
        received = time.monotonic()
        try:
            self._admit(model, request)
        except TokenyardError:
            self._count("rejected")
            raise
        self._active.add(request.request_id)
        self._idle.clear()
        if self._metrics is not None:
            self._metrics.active_requests.inc()
        outcome = "disconnected"  # unless the stream reaches an end of its own
        first_token_s: float | None = None
        produced = 0
        try:
            if request.kv_transfer is not None and self._transfer is not None:
                request = await self._pull(request)
            # Engine timings start when the engine accepts the request; the worker's, on receipt.
            offset = time.monotonic() - received
            async with aclosing(self._engine.generate(request)) as chunks:
                async for chunk in chunks:
                    now = time.monotonic() - received
                    if chunk.token_ids:
                        produced += len(chunk.token_ids)
                        if first_token_s is None:
                            first_token_s = now
                        if self._metrics is not None:
                            self._metrics.generated_tokens.inc(len(chunk.token_ids))
                    if chunk.finish_reason is None:
                        if chunk.token_ids:
                            yield Output(chunk.token_ids)
                        continue
                    usage = chunk.usage or Usage(len(request.token_ids), produced, 0)
                    queued = None if chunk.queued_s is None else offset + chunk.queued_s
                    completion = Completion(
                        chunk.finish_reason,
                        usage,
                        Timings(queued, first_token_s, now),
                        self._stamp(chunk.kv_transfer),
                    )
                    outcome = chunk.finish_reason.value
                    yield Output(chunk.token_ids, completion)
                    return
            outcome = "error"
            raise Unavailable("the engine ended the request without a result")
        except TokenyardError:
            if outcome == "disconnected":
                outcome = "rejected" if produced == 0 else "error"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            self._active.discard(request.request_id)
            if not self._active:
                self._idle.set()
            self._count(outcome)
            if self._metrics is not None:
                self._metrics.active_requests.dec()

    async def _pull(self, request: EngineRequest) -> EngineRequest:
        """Fetch and import the KV ``request.kv_transfer`` names: the request to generate, which
        continues from the imported blocks, or (the fetch failed) computes its prompt here."""
        params, engine, fetcher = request.kv_transfer, self._transfer, self._fetcher
        assert params is not None and engine is not None and fetcher is not None
        hashes = params.block_hashes
        cached = engine.cached_kv_prefix(hashes, request.dp_rank)
        # Blocks held here already need not travel. A complete fetch is what frees the prefill
        # worker's copy, so even when every block is here the last one is fetched.
        wanted = hashes[cached:] or hashes[-1:]
        try:
            fetched = await fetcher.fetch(
                params, wanted, layout=engine.kv_layout(), block_bytes=engine.kv_block_bytes()
            )
            await engine.import_kv_blocks(params, fetched.export)
        except FetchFailed as failed:
            return self._fall_back(request, failed.reason, failed.detail)
        except InvalidArgument as refused:
            return self._fall_back(request, "rejected", str(refused))
        except Exception as exc:  # whatever broke, the request is served (cancellation is not an Exception)
            return self._fall_back(request, "error", f"{type(exc).__name__}: {exc}")
        if self._metrics is not None:
            self._metrics.observe_transfer(
                "received", blocks=len(fetched.export.blocks), nbytes=fetched.nbytes, seconds=fetched.seconds
            )
        log.debug(
            "request %r: imported %d KV blocks (%d cached here) from %s in %.1f ms",
            request.request_id,
            len(fetched.export.blocks),
            cached,
            params.source_address,
            fetched.seconds * 1000.0,
        )
        return request

    def _fall_back(self, request: EngineRequest, reason: str, detail: str) -> EngineRequest:
        params = request.kv_transfer
        assert params is not None
        log.warning(
            "request %r: KV transfer %r from %s failed (%s: %s); computing the prompt here",
            request.request_id,
            params.transfer_id,
            params.source_address,
            reason,
            detail,
        )
        if self._metrics is not None:
            self._metrics.kv_transfer_fallbacks.labels(reason).inc()
        return replace(request, kv_transfer=None)

    def _stamp(self, transfer: KvTransferParams | None) -> KvTransferParams | None:
        if transfer is None:
            return None
        return replace(transfer, source_worker_id=self._worker_id, source_address=self._address)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(outcome).inc()

    # -- drain ------------------------------------------------------------------------------

    async def drain(self, grace_s: float | None, *, wait: bool) -> DrainResult:
        """Stop admitting and let in-flight requests finish; past ``grace_s`` (None: no limit) abort them."""
        already = self._drain is not None
        if self._drain is None:
            drain = self._drain = _Drain(in_flight=len(self._active))
            self._refusal = "draining"
            if self._metrics is not None:
                self._metrics.draining.set(1)
            log.info("draining: %d requests in flight, grace %s", drain.in_flight, grace_s)
            for hook in self._drain_hooks:
                try:
                    await hook()
                except Exception:
                    log.exception("drain hook failed; draining anyway")
            drain.task = asyncio.get_running_loop().create_task(
                self._finish(drain, grace_s), name="worker-drain"
            )
        drain = self._drain
        if wait and drain.task is not None:
            # Shielded: a caller that gives up waiting does not stop the drain.
            await asyncio.shield(drain.task)
        return DrainResult(drain.in_flight, drain.cancelled, already)

    async def _finish(self, drain: _Drain, grace_s: float | None) -> None:
        if grace_s is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except TimeoutError:
                for request_id in tuple(self._active):
                    if self._engine.abort(request_id):
                        drain.cancelled += 1
                log.info("drain grace period over: cancelled %d requests", drain.cancelled)
        await self._idle.wait()
        log.info("drained: no requests in flight")

    async def aclose(self) -> None:
        if self._drain is not None and self._drain.task is not None and not self._drain.task.done():
            self._drain.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain.task
