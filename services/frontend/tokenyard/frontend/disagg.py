"""Disaggregated prefill and decode: which requests a prefill worker computes, and the stream of
one that does.

A model is split while it has both prefill and decode workers (:class:`ServedModel.split`). Its
requests are routed to a decode worker first (KV-aware on the decode pool); then, per request,
the policy decides whether a prefill worker computes the prompt (*remote*) or the decode worker
does it itself (*local*, the "bypass"):

* ``isl_bounding``: local when the prompt is mostly cached on the decode worker chosen, i.e. the
  effective prompt ``eff_isl = isl - cached`` is below ``isl_threshold`` (2048) tokens *and* below
  ``isl_ratio`` (0.7) of the prompt;
* ``prefill_load``: local when the prefill worker chosen is busy: its queued prompt tokens exceed
  ``prefill_busy_frac`` times its ``max_num_batched_tokens`` (the chosen one is the least loaded
  after cache credit, so it stands for the pool);
* ``isl_or_load``: local in either case (the default);
* ``always`` / ``never``.

The optional decode guard (``decode_busy_frac`` > 0) keeps a request remote when its decode worker's
KV blocks in use, with this request's, would exceed that fraction of its pool: a local prefill
would stall every decode there.

A remote request runs as a :class:`SplitStream`: a prefill-only call (one output token) on the
prefill worker, whose last response says where the prompt's KV waits and whose token the client
gets first, then the decode worker's call with those transfer parameters, which continues after
that token. If the prefill
stage fails or takes longer than ``prefill_timeout`` (the prefill worker died, was drained, timed
out, or returned no transfer), the decode worker is asked to compute the prompt itself: the
request is never lost to the prefill pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

import grpc
from opentelemetry import trace

from tokenyard.common.errors import DeadlineExceeded, TokenyardError
from tokenyard.common.logs import request_id_var
from tokenyard.frontend.generation import FinishReason, KvTransfer, Outcome, RouteDecision, TokenChunk, Usage
from tokenyard.frontend.lifecycle import RequestLifecycle

if TYPE_CHECKING:
    from tokenyard.frontend.core import TokenStream
    from tokenyard.frontend.metrics import DisaggSeries

log = logging.getLogger(__name__)


class DisaggPolicy(StrEnum):
    ALWAYS = "always"
    NEVER = "never"
    ISL_BOUNDING = "isl_bounding"
    PREFILL_LOAD = "prefill_load"
    ISL_OR_LOAD = "isl_or_load"


# Reasons of the decisions (the `reason` label of tokenyard_frontend_disagg_decisions_total).
# Remote: the policy always disaggregates; the prompt is not mostly cached on the decode worker;
# the prefill worker is free (prefill_load alone); the decode guard overrode a local decision.
REMOTE_REASONS = ("always", "uncached", "prefill_free", "decode_busy")
# Local: the policy never disaggregates; the prompt is mostly cached on the decode worker; the
# prefill worker (or every one, as the router found) is busy; no prefill worker could be routed to.
LOCAL_REASONS = ("never", "cached", "prefill_busy", "no_prefill_worker")
# Why a prefill stage failed (another prefill worker, or its decode worker, then took the prompt).
FAILURE_REASONS = ("unavailable", "timeout", "error", "no_transfer")
# The failures a prefill stage is tried again for on another prefill worker: the worker went
# away, drains or broke its stream. A timeout has spent the time a retry would need, and an error
# or a missing hand-off would most likely repeat.
RETRIED_FAILURES = frozenset({"unavailable"})

_ISL_POLICIES = (DisaggPolicy.ISL_BOUNDING, DisaggPolicy.ISL_OR_LOAD)
_LOAD_POLICIES = (DisaggPolicy.PREFILL_LOAD, DisaggPolicy.ISL_OR_LOAD)


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    policy: DisaggPolicy = DisaggPolicy.ISL_OR_LOAD
    isl_threshold: int = 2048
    isl_ratio: float = 0.7
    prefill_busy_frac: float = 1.0
    decode_busy_frac: float = 0.0
    prefill_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Decision:
    remote: bool
    reason: str


def prefill_request_id(request_id: str) -> str:
    """The id of a request's prefill stage: the router tracks both stages, each under its own id."""
    return f"{request_id}:prefill"


def mostly_cached(cfg: DisaggConfig, isl: int, cached_tokens: int) -> bool:
    """isl_bounding's test: few tokens to compute, and a small share of the prompt."""
    if isl <= 0:
        return True
    effective = max(0, isl - cached_tokens)
    return effective < cfg.isl_threshold and effective / isl < cfg.isl_ratio


def prefill_busy(cfg: DisaggConfig, prefill: RouteDecision) -> bool:
    """prefill_load's test, on the prefill worker the router chose (its load before this request)."""
    budget = prefill.max_num_batched_tokens
    return budget > 0 and prefill.active_prefill_tokens > cfg.prefill_busy_frac * budget


def decode_guarded(cfg: DisaggConfig, decode: RouteDecision, isl: int, block_size: int) -> bool:
    """The decode guard: the decode worker's blocks in use with this request's would exceed the
    guard's share of its pool (off when the fraction is 0 or the pool size is unknown)."""
    if cfg.decode_busy_frac <= 0 or decode.total_kv_blocks <= 0 or block_size <= 0:
        return False
    new_blocks = max(0, -(-isl // block_size) - decode.overlap_blocks)
    return decode.active_decode_blocks + new_blocks > cfg.decode_busy_frac * decode.total_kv_blocks


def decide(cfg: DisaggConfig, isl: int, decode: RouteDecision, block_size: int) -> Decision:
    """The decision that needs no prefill worker yet: remote (then the prefill pool is routed, and
    :func:`after_prefill_route` may still make it local) or local."""
    if cfg.policy is DisaggPolicy.ALWAYS:
        return Decision(True, "always")
    if cfg.policy is DisaggPolicy.NEVER:
        return Decision(False, "never")
    if cfg.policy in _ISL_POLICIES and mostly_cached(cfg, isl, decode.cached_tokens):
        if decode_guarded(cfg, decode, isl, block_size):
            return Decision(True, "decode_busy")
        return Decision(False, "cached")
    return Decision(True, "uncached" if cfg.policy in _ISL_POLICIES else "prefill_free")


def after_prefill_route(cfg: DisaggConfig, first: Decision, prefill: RouteDecision) -> Decision:
    """The final decision once the prefill worker is known (prefill_load's part)."""
    if first.reason == "decode_busy" or cfg.policy not in _LOAD_POLICIES:
        return first
    return Decision(False, "prefill_busy") if prefill_busy(cfg, prefill) else first


class StageSpans(Protocol):
    """The request's trace, as far as the split stream opens and ends stages in it."""

    def open_prefill(self, worker_id: int) -> trace.Span: ...

    def end_prefill(self, error: str | None) -> None: ...

    def open_generate(self) -> trace.Span: ...


# Opens the prefill worker's call with a deadline in seconds (prefill_only, one token).
PrefillOpener = Callable[[float], "TokenStream"]
# Opens the decode worker's call: the prompt followed by ``emitted`` (the prefill's token, already
# streamed), importing the prompt's KV from ``transfer`` (None: the decode worker computes it).
DecodeOpener = Callable[[KvTransfer | None, Sequence[int]], "TokenStream"]


@dataclass(frozen=True, slots=True)
class PrefillAttempt:
    """A prefill stage routed to a prefill worker: where, how to open it, and its router record."""

    worker_id: int
    open: PrefillOpener
    lifecycle: RequestLifecycle


# Routes the prefill stage again, to a prefill worker not in the set given; None when there is none.
PrefillRetry = Callable[[frozenset[int]], Awaitable[PrefillAttempt | None]]


class SplitStream:
    """A disaggregated request's worker stream as :class:`~tokenyard.frontend.core.Generation`
    consumes it: the prefill stage runs on the first read, then the decode worker's chunks follow.

    The prefill worker's one token is the request's first (so the time to first token is the
    prefill's): it is streamed at once, and the decode worker continues after it, with the
    prompt's KV from the prefill worker. A request that this token completes (``max_tokens`` 1, or
    an end-of-sequence token) never reaches its decode worker. With ``emit_first`` false (structured
    output, which the prefill worker does not constrain) the token is dropped and the decode worker
    generates every token.

    The prefill stage is a request of its own at the router (its own id, see
    :func:`prefill_request_id`): it is told how the stage ended exactly once, whatever happens
    (handed off, failed, cancelled). A prefill worker that goes away before the hand-off (see
    :data:`RETRIED_FAILURES`) is replaced by another prefill worker, routed through ``retry``, up
    to ``max_retries`` times; only then does the decode worker compute the prompt itself. Cancelling cancels whichever call is open. The usage of the
    last chunk counts the client's prompt and every output token, and the prompt tokens the
    *prefill* worker found cached (the decode worker counts every imported token as cached, which
    says nothing about the prefix cache).
    """

    __slots__ = (
        "_cached",
        "_deadline",
        "_decode",
        "_emit_first",
        "_emitted",
        "_lifecycle",
        "_max_tokens",
        "_open_decode",
        "_open_prefill",
        "_prefill",
        "_prefill_worker",
        "_prompt_tokens",
        "_request_id",
        "_request_timeout",
        "_retries_left",
        "_retry",
        "_series",
        "_spans",
        "_started",
        "_timeout",
        "_tried",
        "decoded",
        "transfer",
    )

    def __init__(
        self,
        open_prefill: PrefillOpener,
        open_decode: DecodeOpener,
        lifecycle: RequestLifecycle,
        series: DisaggSeries,
        *,
        request_id: str,
        prefill_worker: int,
        prompt_tokens: int,
        max_tokens: int | None,
        timeout: float,
        emit_first: bool = True,
        deadline: float | None = None,
        request_timeout: float = 0.0,
        spans: StageSpans | None = None,
        retry: PrefillRetry | None = None,
        max_retries: int = 1,
    ) -> None:
        self._open_prefill = open_prefill
        self._open_decode = open_decode
        self._lifecycle = lifecycle
        self._series = series
        self._request_id = request_id
        self._prefill_worker = prefill_worker
        self._prompt_tokens = prompt_tokens
        self._max_tokens = max_tokens
        self._timeout = timeout
        self._emit_first = emit_first
        # perf_counter() instant the whole request must end by (None: no limit).
        self._deadline = deadline
        self._request_timeout = request_timeout
        self._spans = spans
        self._retry = retry
        self._retries_left = max_retries if retry is not None else 0
        # Prefill workers this stage failed on.
        self._tried: set[int] = set()
        self._started = False
        self._prefill: TokenStream | None = None
        self._decode: TokenStream | None = None
        self._cached: int | None = None
        # The prefill's tokens streamed to the client (the decode worker continues after them).
        self._emitted: tuple[int, ...] = ()
        # Where the prompt's KV waits, once the prefill stage handed it off.
        self.transfer: KvTransfer | None = None
        # The decode worker has sent something (its request can no longer restart from the transfer).
        self.decoded = False

    def handoff(self) -> KvTransfer | None:
        """The transfer a decode worker may still start from: the prompt's KV, while no decode
        worker has produced a token after the prefill's."""
        return None if self.decoded else self.transfer

    def __aiter__(self) -> SplitStream:
        return self

    async def __anext__(self) -> TokenChunk:
        decode = self._decode
        if decode is None:
            token = request_id_var.set(self._request_id)
            try:
                if not self._started:
                    self._started = True
                    first = await self._prefill_stage()
                    if first is not None:
                        return first
                spans = self._spans
                if spans is None:
                    decode = self._open_decode(self.transfer, self._emitted)
                else:
                    # The decode worker's Generate span joins the trace under this one.
                    with trace.use_span(spans.open_generate(), end_on_exit=False):
                        decode = self._open_decode(self.transfer, self._emitted)
                self._decode = decode
            finally:
                request_id_var.reset(token)
        chunk = await decode.__anext__()
        self.decoded = True
        if chunk.finish_reason is not None and chunk.usage is not None and (self._cached is not None):
            usage = chunk.usage
            chunk.usage = Usage(
                self._prompt_tokens, usage.completion_tokens + len(self._emitted), self._cached
            )
        return chunk

    def cancel(self) -> None:
        if self._prefill is not None:
            self._prefill.cancel()
        if self._lifecycle.finish(Outcome.CANCELLED, 0) and self._spans is not None:
            self._spans.end_prefill("cancelled")
        if self._decode is not None:
            self._decode.cancel()

    def _limit(self) -> tuple[float, bool]:
        """Seconds the prefill stage may take, and whether the request's own deadline is what
        bounds it (then running out fails the request instead of falling back)."""
        if self._deadline is None:
            return self._timeout, False
        left = self._deadline - time.perf_counter()
        if left <= self._timeout:
            return left, True
        return self._timeout, False

    def _timed_out(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the request took longer than {self._request_timeout:g}s "
            "(--request-timeout / TOKENYARD_FRONTEND_REQUEST_TIMEOUT)"
        )

    async def _prefill_stage(self) -> TokenChunk | None:
        """Run the prefill stage. Returns the chunk to stream first (the prefill's token; final
        when it completes the request), or None: the decode worker goes on (with ``transfer`` set
        after a hand-off, or computing the prompt after a failure)."""
        while True:
            handed, failure = await self._run_prefill()
            if handed is not None or not await self._next_prefill_worker(failure):
                break
        if handed is None:
            log.warning(
                "request %s: its decode worker computes the prompt (prefill on worker %d: %s)",
                self._request_id,
                self._prefill_worker,
                failure,
            )
            return None
        self.transfer, last = handed
        if not self._emit_first or not last.token_ids:
            return None
        self._emitted = tuple(last.token_ids)
        n = len(self._emitted)
        finish = None
        if last.finish_reason is FinishReason.STOP:
            finish = FinishReason.STOP
        elif self._max_tokens is not None and n >= self._max_tokens:
            finish = FinishReason.LENGTH
        if finish is None:
            return TokenChunk(self._emitted)
        # Done in its first token: the decode worker is never asked.
        self.decoded = True
        return TokenChunk(self._emitted, finish, Usage(self._prompt_tokens, n, self._cached or 0))

    async def _next_prefill_worker(self, failure: str) -> bool:
        """After a failed attempt: route the stage to another prefill worker when the failure is
        worth a retry and retries are left; whether it was (the next attempt is set up)."""
        if failure.split(":", 1)[0] not in RETRIED_FAILURES or self._retries_left <= 0 or self._retry is None:
            return False
        self._retries_left -= 1
        self._tried.add(self._prefill_worker)
        attempt = await self._retry(frozenset(self._tried))
        if attempt is None:
            return False
        log.info(
            "request %s: prefill on worker %d failed (%s); trying prefill worker %d",
            self._request_id,
            self._prefill_worker,
            failure,
            attempt.worker_id,
        )
        self._series.retries.inc()
        self._prefill_worker = attempt.worker_id
        self._open_prefill = attempt.open
        self._lifecycle = attempt.lifecycle
        self._prefill = None
        return True

    async def _run_prefill(self) -> tuple[tuple[KvTransfer | None, TokenChunk] | None, str]:
        """One attempt at the prefill stage: (the hand-off and the prefill's last chunk, "") or
        (None, "reason: detail") after a failure."""
        began = time.perf_counter()
        limit, bound_by_request = self._limit()
        if limit <= 0:
            return None, self._fail("timeout", "no time left", bound_by_request)
        if self._spans is not None:
            with trace.use_span(self._spans.open_prefill(self._prefill_worker), end_on_exit=False):
                stream = self._prefill = self._open_prefill(limit)
        else:
            stream = self._prefill = self._open_prefill(limit)
        last: TokenChunk | None = None
        try:
            async with asyncio.timeout(limit):
                async for chunk in stream:
                    if chunk.finish_reason is not None:
                        last = chunk
                        break
        except TimeoutError:
            return None, self._fail("timeout", f"no hand-off within {limit:.3g}s", bound_by_request)
        except TokenyardError as exc:
            if exc.code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return None, self._fail("timeout", str(exc), bound_by_request)
            if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                # The worker went away, drains, or its stream broke.
                return None, self._fail("unavailable", str(exc))
            return None, self._fail("error", str(exc))
        except asyncio.CancelledError:
            self.cancel()
            raise
        if last is None:
            return None, self._fail("unavailable", "the prefill worker ended the stream without finishing")
        # A first token that ends the request (end of sequence, or all it asked for): nothing to
        # hand over.
        n = len(last.token_ids)
        complete = (
            self._emit_first
            and n > 0
            and (
                last.finish_reason is FinishReason.STOP
                or (self._max_tokens is not None and n >= self._max_tokens)
            )
        )
        if last.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH) or (
            last.kv_transfer is None and not complete
        ):
            return None, self._fail(
                "no_transfer", f"finished with {last.finish_reason} and no transfer parameters"
            )
        self._lifecycle.finish(Outcome.FINISHED, len(last.token_ids))
        self._series.prefill_seconds.observe(time.perf_counter() - began)
        if self._spans is not None:
            self._spans.end_prefill(None)
        self._cached = last.usage.cached_tokens if last.usage is not None else 0
        return (last.kv_transfer, last), ""

    def _fail(self, reason: str, detail: str, fatal: bool = False) -> str:
        """This attempt is over without a hand-off: ends it at the router and counts it; returns
        "reason: detail". Fails the request instead when its own deadline ran out."""
        if self._prefill is not None:
            self._prefill.cancel()
        self._lifecycle.finish(Outcome.FAILED, 0)
        if self._spans is not None:
            self._spans.end_prefill(f"{reason}: {detail}")
        if fatal:
            raise self._timed_out()
        self._series.failures[reason].inc()
        return f"{reason}: {detail}"
