"""The one request pipeline behind both surfaces (OpenAI HTTP and KServe gRPC).

validate → template and tokenize → block hashes → Route → Generate on the chosen worker →
token chunks → incremental detokenization and stop strings → :class:`Delta` values.

:meth:`Frontend.start` does everything up to opening the worker call and raises domain errors
(InvalidArgument, NotFound, Unavailable, Overloaded) before anything was streamed, so that a
surface can still answer with a status. The :class:`Generation` it returns must be closed
(``async with`` or :meth:`Generation.aclose`): closing early, an error or a cancellation of the
consuming task (a client that went away) cancels the worker call, which frees the request's KV
blocks, and the router hears exactly once how the request ended.

A worker that dies or whose stream breaks mid-request does not end the request: the
:class:`Generation` routes the rest of it again (the prompt plus the tokens generated so far,
under the same request id) and keeps streaming from the new worker, up to the migration limit.

A model served by prefill and decode workers is *split* (:mod:`tokenyard.frontend.disagg`): the
request is routed to a decode worker first, then the policy decides whether a prefill worker
computes its prompt; if so, the prefill pool is routed too and the :class:`Generation` reads a
:class:`~tokenyard.frontend.disagg.SplitStream` (prefill stage, then the decode worker's tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Protocol

import grpc
import xxhash
from opentelemetry import trace
from opentelemetry.context import Context

from tokenyard.common import tracing
from tokenyard.common.discovery import ModelCard
from tokenyard.common.errors import DeadlineExceeded, TokenyardError, Unavailable
from tokenyard.common.hashing import local_block_hashes, salt_hash
from tokenyard.common.logs import log_fields, request_id_var
from tokenyard.frontend.chat_output import check_capabilities
from tokenyard.frontend.clients import RouterClient, WorkerClients
from tokenyard.frontend.disagg import (
    DisaggConfig,
    DisaggPolicy,
    PrefillAttempt,
    PrefillOpener,
    SplitStream,
    after_prefill_route,
    decide,
    prefill_request_id,
)
from tokenyard.frontend.generation import (
    Delta,
    FinishReason,
    GenerationRequest,
    KvTransfer,
    Outcome,
    RouteDecision,
    Sampling,
    StopConditions,
    TokenChunk,
    Usage,
    WorkerRequest,
)
from tokenyard.frontend.lifecycle import RequestLifecycle
from tokenyard.frontend.limits import Admission, Limits, check_stop_strings
from tokenyard.frontend.metrics import FrontendMetrics, error_type
from tokenyard.frontend.models import ModelRegistry, ServedModel
from tokenyard.frontend.preprocess import Prepared, Preprocessor
from tokenyard.frontend.stop_strings import StopStringMatcher
from tokenyard.frontend.tokenizer import DetokenizeStream, Tokenizer

log = logging.getLogger(__name__)

_OUTCOME_OF = {
    FinishReason.STOP: Outcome.FINISHED,
    FinishReason.LENGTH: Outcome.FINISHED,
    FinishReason.CANCELLED: Outcome.CANCELLED,
    FinishReason.ERROR: Outcome.FAILED,
}


class TokenStream(Protocol):
    """A worker's Generate call as the pipeline consumes it."""

    def __aiter__(self) -> TokenStream: ...

    async def __anext__(self) -> TokenChunk: ...

    def cancel(self) -> None: ...


class _LengthReached:
    """The stream of a request that lost its worker after the last token it asked for: only the
    finish is missing, so nothing is left to migrate."""

    def __init__(self) -> None:
        self._done = False

    def __aiter__(self) -> _LengthReached:
        return self

    async def __anext__(self) -> TokenChunk:
        if self._done:
            raise StopAsyncIteration
        self._done = True
        return TokenChunk((), FinishReason.LENGTH)

    def cancel(self) -> None:
        pass


# How a lost worker or a broken HTTP/2 stream reads when grpc reports it as INTERNAL rather
# than UNAVAILABLE (a peer killed mid-stream resets the stream or closes the socket).
_BROKEN_STREAM = (
    "stream removed",
    "rst_stream",
    "socket closed",
    "connection reset",
    "broken pipe",
    "goaway",
    "stream terminated",
)

# Opens the rest of a request elsewhere: (tokens generated so far, workers to avoid) -> the
# chosen worker and its stream.
Reroute = Callable[[Sequence[int], frozenset[int]], Awaitable[tuple[int, TokenStream]]]


def timeout_error(timeout: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the request took longer than {timeout:g}s (--request-timeout / TOKENYARD_FRONTEND_REQUEST_TIMEOUT)"
    )


class RequestSpans:
    """One trace per request: a ``request`` span with ``tokenize``, ``route`` and ``generate``
    children; the router's and the worker's spans join it through the calls' trace context.
    Built only when tracing is on."""

    __slots__ = ("_context", "_tracer", "generate", "prefill", "root")

    def __init__(
        self, tracer: trace.Tracer, parent: Context | None, request: GenerationRequest, request_id: str
    ):
        self._tracer = tracer
        self.root = tracer.start_span(
            "frontend.request",
            context=parent,
            kind=trace.SpanKind.SERVER if parent is not None else trace.SpanKind.INTERNAL,
            attributes={
                "tokenyard.request_id": request_id,
                "tokenyard.model": request.model,
                "tokenyard.endpoint": request.endpoint.value,
                "tokenyard.stream": request.stream,
            },
        )
        self._context = trace.set_span_in_context(self.root)
        self.generate: trace.Span | None = None
        # The prefill stage of a split request, until it ended.
        self.prefill: trace.Span | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[trace.Span]:
        with self._tracer.start_as_current_span(name, context=self._context) as span:
            yield span

    def open_generate(self) -> trace.Span:
        self.generate = self._tracer.start_span("generate", context=self._context)
        return self.generate

    def open_prefill(self, worker_id: int) -> trace.Span:
        """The prefill stage of a split request: the prefill worker's Generate span joins under it."""
        self.prefill = self._tracer.start_span(
            "prefill", context=self._context, attributes={"tokenyard.prefill_worker_id": worker_id}
        )
        return self.prefill

    def end_prefill(self, error: str | None) -> None:
        span, self.prefill = self.prefill, None
        if span is None:
            return
        if error is not None:
            span.set_status(trace.StatusCode.ERROR, error)
        span.end()

    def end(self, outcome: Outcome, output_tokens: int, migrations: int, exc: BaseException | None) -> None:
        self.end_prefill(outcome.value if outcome is not Outcome.FINISHED else None)
        for span in (self.generate, self.root):
            if span is None:
                continue
            span.set_attribute("tokenyard.outcome", outcome.value)
            span.set_attribute("tokenyard.output_tokens", output_tokens)
            if exc is not None:
                span.set_status(trace.StatusCode.ERROR, str(exc) or type(exc).__name__)
            span.end()
        if migrations:
            self.root.set_attribute("tokenyard.migrations", migrations)

    def fail(self, exc: BaseException) -> None:
        """The request ended before a worker took it."""
        self.root.set_status(trace.StatusCode.ERROR, str(exc) or type(exc).__name__)
        self.root.end()


# How often a migrating request whose model lost every worker looks for a replacement.
REPLACEMENT_POLL_S = 0.05


def new_request_id() -> str:
    return uuid.uuid4().hex


def worker_lost(exc: BaseException) -> bool:
    """Whether a failed worker stream may be continued on another worker: the worker or the
    connection went away. A cancelled call (the client left), a rejected request or an engine
    error would fail the same way anywhere."""
    if isinstance(exc, Unavailable):
        return True
    if type(exc) is TokenyardError and exc.code is grpc.StatusCode.INTERNAL:
        message = str(exc).lower()
        return any(marker in message for marker in _BROKEN_STREAM)
    return False


class Frontend:
    def __init__(
        self,
        models: ModelRegistry,
        preprocessor: Preprocessor,
        router: RouterClient,
        workers: WorkerClients,
        metrics: FrontendMetrics,
        *,
        migration_limit: int = 3,
        replacement_wait: float = 5.0,
        limits: Limits | None = None,
        disagg: DisaggConfig | None = None,
    ) -> None:
        self.models = models
        self._pre = preprocessor
        self._router = router
        self._workers = workers
        self._metrics = metrics
        self._migration_limit = migration_limit
        self._replacement_wait = replacement_wait
        metrics.migration_limit.set(migration_limit)
        self.limits = limits or Limits()
        self.disagg = disagg or DisaggConfig()
        self.admission = Admission(self.limits.max_inflight_requests)
        models.on_model(
            lambda card: metrics.model_card(
                card.model, card.total_kv_blocks, card.context_length, card.block_size
            )
        )

    async def start(
        self, request: GenerationRequest, request_id: str | None = None, trace_parent: Context | None = None
    ) -> Generation:
        """Validate, tokenize, route and open the worker call; raises domain errors.

        ``trace_parent``: the caller's trace context (an HTTP ``traceparent``); gRPC requests
        already run inside the span of their RPC."""
        started = time.perf_counter()
        request_id = request_id or new_request_id()
        try:
            self.admission.admit()
        except TokenyardError as exc:
            self.count_failure(request, exc)
            self.count_rejection(request, "frontend_limit")
            raise
        try:
            return await self._start(request, request_id, started, trace_parent)
        except BaseException:
            self.admission.release()
            raise

    async def _start(
        self, request: GenerationRequest, request_id: str, started: float, trace_parent: Context | None
    ) -> Generation:
        limits = self.limits
        try:
            max_tokens = limits.output_tokens(request.stop.max_tokens)
            check_stop_strings(request.stop.stop_strings)
        except TokenyardError as exc:
            self.count_failure(request, exc)
            raise
        if max_tokens != request.stop.max_tokens:
            request = replace(request, stop=replace(request.stop, max_tokens=max_tokens))
        sampling = request.sampling
        if self._migration_limit and sampling.seed is None:
            # A migrated request continues where it stopped only if the engine samples the rest
            # with the seed it began with; one derived from the request id survives re-routing.
            # Only the worker requests carry it: rebuilding the whole request would cost more.
            sampling = replace(sampling, seed=xxhash.xxh3_64_intdigest(request_id.encode()))
        tracer = tracing.tracer()
        spans = RequestSpans(tracer, trace_parent, request, request_id) if tracer is not None else None
        timeout = limits.request_timeout
        # Within this scope, logs and outgoing calls (Route, Generate) carry the request id.
        token = request_id_var.set(request_id)
        try:
            try:
                if timeout:
                    try:
                        async with asyncio.timeout(timeout):
                            routed = await self._route(request, request_id, spans)
                    except TimeoutError:
                        expired = timeout_error(timeout)
                        self.count_failure(request, expired)
                        raise expired from None
                else:
                    routed = await self._route(request, request_id, spans)
            except (asyncio.CancelledError, DeadlineExceeded) as exc:
                # Cut short while the Route call may have reached the router: tell it the request
                # is over, or it would count the load until its expiry (a no-op if it never saw it).
                cancelled = isinstance(exc, asyncio.CancelledError)
                self._router.notify_finished(
                    request_id, Outcome.CANCELLED if cancelled else Outcome.FAILED, 0
                )
                raise
            card, _, prepared, _, _ = routed
            max_tokens = limits.default_output(
                request.stop.max_tokens, len(prepared.token_ids), card.context_length
            )
            if max_tokens != request.stop.max_tokens:
                request = replace(request, stop=replace(request.stop, max_tokens=max_tokens))
            return self._open(request, request_id, started, sampling, *routed, spans)
        except BaseException as exc:
            if spans is not None:
                spans.fail(exc)
            raise
        finally:
            request_id_var.reset(token)

    async def _route(
        self, request: GenerationRequest, request_id: str, spans: RequestSpans | None
    ) -> tuple[ModelCard, Tokenizer, Prepared, RouteDecision, RouteDecision | None]:
        """Tokenize and route; for a split model, also decide where the prompt is computed and
        route the prefill pool if remotely (the last element: the prefill worker, or None)."""
        try:
            card = self.models.card(request.model)
            check_capabilities(card, request)
            tokenizer = await self._pre.tokenizer(card.tokenizer)
            began = time.perf_counter()
            if spans is None:
                prepared = await self._pre.prepare_async(tokenizer, request, card)
            else:
                with spans.stage("tokenize") as span:
                    prepared = await self._pre.prepare_async(tokenizer, request, card)
                    span.set_attribute("tokenyard.prompt_tokens", len(prepared.token_ids))
            self._metrics.model(request.model).tokenize_ms.observe((time.perf_counter() - began) * 1000)
            self.limits.check_prompt(len(prepared.token_ids))
            served = self.models.get(request.model)
            split = served is not None and served.split and self.disagg.policy is not DisaggPolicy.NEVER
            with spans.stage("route") if spans is not None else contextlib.nullcontext():
                decision = await self._router.route(
                    request_id=request_id,
                    model=request.model,
                    block_hashes=prepared.block_hashes,
                    isl_tokens=len(prepared.token_ids),
                    priority=request.priority,
                    pool="decode" if split else "",
                    session_id=request.session_id,
                    expected_output_tokens=request.expected_output_tokens,
                )
        except TokenyardError as exc:
            self.count_failure(request, exc)
            if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.count_rejection(request, "overload")
            raise
        prefill = None
        if split:
            prefill = await self._route_prefill(request, request_id, card, prepared, decision, spans)
        elif served is not None and served.split:
            self._metrics.disagg(request.model).decided(False, "never")
        return card, tokenizer, prepared, decision, prefill

    def _client_pool(self, served: ServedModel) -> tuple[str, list[int]]:
        """The pool a request's generating worker comes from, and its workers' ids: the decode
        pool while the model is split (unless disaggregation is off), else every worker that
        serves clients whole."""
        if self.disagg.policy is DisaggPolicy.NEVER:
            return "", list(served.instances)
        return served.client_pool()

    async def _route_prefill(
        self,
        request: GenerationRequest,
        request_id: str,
        card: ModelCard,
        prepared: Prepared,
        decode: RouteDecision,
        spans: RequestSpans | None,
    ) -> RouteDecision | None:
        """Where a split model's request is prefilled: the prefill worker routed to, or None for
        its decode worker (counted in tokenyard_frontend_disagg_decisions_total either way)."""
        cfg = self.disagg
        series = self._metrics.disagg(request.model)
        isl = len(prepared.token_ids)
        decision = decide(cfg, isl, decode, card.block_size)
        if not decision.remote:
            series.decided(False, decision.reason)
            return None
        prefill_id = prefill_request_id(request_id)
        try:
            with spans.stage("route_prefill") if spans is not None else contextlib.nullcontext():
                prefill = await self._router.route(
                    request_id=prefill_id,
                    model=request.model,
                    block_hashes=prepared.block_hashes,
                    isl_tokens=isl,
                    priority=request.priority,
                    pool="prefill",
                )
        except TokenyardError as exc:
            busy = exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            log.info("request %s prefills on its decode worker: %s", request_id, exc)
            series.decided(False, "prefill_busy" if busy else "no_prefill_worker")
            return None
        decision = after_prefill_route(cfg, decision, prefill)
        series.decided(decision.remote, decision.reason)
        if not decision.remote:
            # Routed only to learn the load: the router drops it again.
            self._router.notify_finished(prefill_id, Outcome.CANCELLED, 0)
            return None
        return prefill

    def _open(
        self,
        request: GenerationRequest,
        request_id: str,
        started: float,
        sampling: Sampling,
        card: ModelCard,
        tokenizer: Tokenizer,
        prepared: Prepared,
        decision: RouteDecision,
        prefill: RouteDecision | None,
        spans: RequestSpans | None,
    ) -> Generation:
        lifecycle = RequestLifecycle(self._router, request_id)
        deadline = started + self.limits.request_timeout if self.limits.request_timeout else None
        split: SplitStream | None = None
        stream: TokenStream
        try:
            if prefill is not None:
                stream = split = self._split(
                    request, request_id, prepared, sampling, decision, prefill, deadline, spans
                )
            elif spans is None:
                stream = self._generate(
                    request, request_id, prepared.token_ids, sampling, request.stop, decision, deadline
                )
            else:
                # The worker's Generate span joins the trace under this one.
                with trace.use_span(spans.open_generate(), end_on_exit=False):
                    stream = self._generate(
                        request, request_id, prepared.token_ids, sampling, request.stop, decision, deadline
                    )
        except Exception as exc:
            lifecycle.finish(Outcome.FAILED, 0)
            self.count_failure(request, exc)
            raise
        reroute: Reroute | None = None
        # Structured output is never migrated (as in the reference): a constrained generation
        # cannot resume from the middle of a document.
        if self._migration_limit and request.guided is None:

            async def reroute(generated: Sequence[int], avoid: frozenset[int]) -> tuple[int, TokenStream]:
                # A decode worker lost before its first token leaves the prompt's KV where the
                # prefill worker put it: the next one imports it too (or computes the prompt if it
                # is gone). After it generated tokens, the next one computes it all.
                transfer = split.handoff() if split is not None else None
                return await self._reroute(
                    request, request_id, prepared.token_ids, sampling, generated, avoid, deadline, transfer
                )

        return Generation(
            request,
            request_id,
            prepared,
            stream,
            lifecycle,
            DetokenizeStream(tokenizer),
            self._metrics,
            started,
            worker_id=decision.worker_id,
            reroute=reroute,
            migration_limit=self._migration_limit,
            admission=self.admission,
            spans=spans,
            timeout=self.limits.request_timeout,
            eos_token_id=tokenizer.eos_token_id,
            card=card,
        )

    def _generate(
        self,
        request: GenerationRequest,
        request_id: str,
        token_ids: Sequence[int],
        sampling: Sampling,
        stop: StopConditions,
        decision: RouteDecision,
        deadline: float | None,
        *,
        kv_transfer: KvTransfer | None = None,
        prefill_only: bool = False,
        timeout_cap: float | None = None,
    ) -> TokenStream:
        timeout = None
        if deadline is not None:
            timeout = deadline - time.perf_counter()
            if timeout <= 0:
                raise timeout_error(self.limits.request_timeout)
        if timeout_cap is not None:
            timeout = timeout_cap if timeout is None else min(timeout, timeout_cap)
        worker_request = WorkerRequest(
            request_id=request_id,
            model=request.model,
            token_ids=token_ids,
            sampling=sampling,
            stop=stop,
            priority=request.priority,
            dp_rank=decision.dp_rank,
            lora_name=request.lora_name,
            cache_salt=request.cache_salt,
            timeout=timeout,
            # The prefill worker does not constrain its one token (a guided request drops it).
            guided=None if prefill_only else request.guided,
            prefill_only=prefill_only,
            kv_transfer=kv_transfer,
        )
        return self._workers.generate(decision.address, worker_request)

    def _split(
        self,
        request: GenerationRequest,
        request_id: str,
        prepared: Prepared,
        sampling: Sampling,
        decode: RouteDecision,
        prefill: RouteDecision,
        deadline: float | None,
        spans: RequestSpans | None,
    ) -> SplitStream:
        """The stream of a request prefilled remotely: the prefill stage (whose token is the
        request's first), then the decode worker, continuing after it."""
        prompt = prepared.token_ids
        prefill_id = prefill_request_id(request_id)
        stop = request.stop
        # One output token, under the request's own rules for a first token.
        prefill_stop = StopConditions(
            max_tokens=1,
            min_tokens=min(1, stop.min_tokens),
            stop_token_ids=stop.stop_token_ids,
            ignore_eos=stop.ignore_eos,
        )

        def opener(worker: RouteDecision) -> PrefillOpener:
            def open_prefill(timeout: float) -> TokenStream:
                return self._generate(
                    request, prefill_id, prompt, sampling, prefill_stop, worker, deadline,
                    prefill_only=True, timeout_cap=timeout,
                )  # fmt: skip

            return open_prefill

        async def retry(avoid: frozenset[int]) -> PrefillAttempt | None:
            served = self.models.get(request.model)
            allowed = [w for w in (served.prefill if served is not None else {}) if w not in avoid]
            if not allowed:
                return None
            try:
                again = await self._router.route(
                    request_id=prefill_id,
                    model=request.model,
                    block_hashes=prepared.block_hashes,
                    isl_tokens=len(prompt),
                    priority=request.priority,
                    pool="prefill",
                    allowed_worker_ids=allowed,
                )
            except TokenyardError as exc:
                log.info("request %s: no other prefill worker to retry on: %s", request_id, exc)
                return None
            return PrefillAttempt(again.worker_id, opener(again), RequestLifecycle(self._router, prefill_id))

        def open_decode(transfer: KvTransfer | None, emitted: Sequence[int]) -> TokenStream:
            n = len(emitted)
            rest = stop if not n else replace(
                stop,
                max_tokens=None if stop.max_tokens is None else stop.max_tokens - n,
                min_tokens=max(0, stop.min_tokens - n),
            )  # fmt: skip
            token_ids = [*prompt, *emitted] if n else prompt
            return self._generate(
                request, request_id, token_ids, sampling, rest, decode, deadline, kv_transfer=transfer
            )

        return SplitStream(
            opener(prefill),
            open_decode,
            RequestLifecycle(self._router, prefill_id),
            self._metrics.disagg(request.model),
            request_id=request_id,
            prefill_worker=prefill.worker_id,
            prompt_tokens=len(prompt),
            max_tokens=stop.max_tokens,
            timeout=self.disagg.prefill_timeout,
            # The prefill worker does not constrain its token: structured output starts on the
            # decode worker.
            emit_first=request.guided is None,
            deadline=deadline,
            request_timeout=self.limits.request_timeout,
            spans=spans,
            retry=retry,
        )

    async def _reroute(
        self,
        request: GenerationRequest,
        request_id: str,
        prompt: Sequence[int],
        sampling: Sampling,
        generated: Sequence[int],
        avoid: frozenset[int],
        deadline: float | None,
        kv_transfer: KvTransfer | None = None,
    ) -> tuple[int, TokenStream]:
        """Route the rest of a request (prompt and the tokens generated so far, the same request
        id: the router replaces the old assignment) and open it on the worker chosen; a split
        model's request moves within the decode pool."""
        token = request_id_var.set(request_id)
        try:
            card = self.models.card(request.model)
            token_ids = [*prompt, *generated]
            loop = asyncio.get_running_loop()
            wait_until = loop.time() + self._replacement_wait
            while True:
                served = self.models.get(request.model)
                pool, ids = self._client_pool(served) if served is not None else ("", [])
                # The lost worker stays eligible only where nothing else serves the model (its lease
                # has not expired yet, so the router still counts it).
                allowed = [w for w in ids if w not in avoid]
                try:
                    if not allowed and loop.time() < wait_until:
                        # Every worker of the model is lost: a standby taking over or a worker
                        # restarting registers within moments; routing back to the dead one
                        # would spend the request's migrations in a millisecond.
                        raise Unavailable(f"no live worker serves {request.model!r}")
                    decision = await self._router.route(
                        request_id=request_id,
                        model=request.model,
                        block_hashes=local_block_hashes(
                            token_ids, card.block_size, salt_hash(request.lora_name, request.cache_salt)
                        ),
                        isl_tokens=len(token_ids),
                        priority=request.priority,
                        allowed_worker_ids=allowed,
                        pool=pool,
                        session_id=request.session_id,
                        expected_output_tokens=request.expected_output_tokens,
                    )
                    break
                except Unavailable:
                    # The router learns of a new worker from discovery on its own schedule.
                    if loop.time() >= wait_until:
                        raise
                    await asyncio.sleep(REPLACEMENT_POLL_S)
            n = len(generated)
            stop = replace(
                request.stop,
                max_tokens=None if request.stop.max_tokens is None else request.stop.max_tokens - n,
                min_tokens=max(0, request.stop.min_tokens - n),
            )
            return decision.worker_id, self._generate(
                request, request_id, token_ids, sampling, stop, decision, deadline, kv_transfer=kv_transfer
            )
        finally:
            request_id_var.reset(token)

    def count_failure(
        self, request: GenerationRequest | None, exc: BaseException, endpoint: str = ""
    ) -> None:
        """Count a request that failed before it streamed anything (also parse errors of a surface)."""
        if request is None:
            self._metrics.count("", endpoint, False, "error", error_type(exc))
            return
        # Label values from client input stay bounded: unknown models are counted as "".
        model = request.model if self.models.is_known(request.model) else ""
        self._metrics.count(model, request.endpoint.value, request.stream, "error", error_type(exc))

    def client_disconnected(self) -> None:
        self._metrics.disconnected.inc()

    def count_rejection(self, request: GenerationRequest | None, reason: str, endpoint: str = "") -> None:
        if request is None:
            self._metrics.rejections.labels("", endpoint, reason).inc()
            return
        model = request.model if self.models.is_known(request.model) else ""
        self._metrics.rejections.labels(model, request.endpoint.value, reason).inc()


class Generation:
    """The output of one request as :class:`Delta` values; the last has finish_reason and usage."""

    def __init__(
        self,
        request: GenerationRequest,
        request_id: str,
        prepared: Prepared,
        stream: TokenStream,
        lifecycle: RequestLifecycle,
        detokenizer: DetokenizeStream,
        metrics: FrontendMetrics,
        started: float,
        *,
        worker_id: int = 0,
        reroute: Reroute | None = None,
        migration_limit: int = 0,
        admission: Admission | None = None,
        spans: RequestSpans | None = None,
        timeout: float = 0.0,
        eos_token_id: int | None = None,
        card: ModelCard | None = None,
    ) -> None:
        self.request = request
        # The served model's card (output parsers of the surfaces read it).
        self.card = card
        self.request_id = request_id
        self.prompt_tokens = len(prepared.token_ids)
        self._prompt_text = prepared.prompt_text
        self._stream = stream
        self._worker_id = worker_id
        self._reroute = reroute
        self._migration_limit = migration_limit if reroute is not None else 0
        self.migrations = 0
        self._lifecycle = lifecycle
        self._detok = detokenizer
        self._hidden = frozenset(
            (*request.stop.stop_token_ids, *((eos_token_id,) if eos_token_id is not None else ()))
        )
        self._metrics = metrics
        self._started = started
        self._admission = admission
        self._spans = spans
        self._timeout = timeout
        # Seconds spent detokenizing (observed once, at the end).
        self._detok_s = 0.0
        series = metrics.model(request.model)
        series.active.inc()
        series.isl.observe(self.prompt_tokens)
        self._gen = self._run()
        # The next delta: what ``__anext__`` returns, minus one coroutine per token for
        # consumers that loop over a long stream.
        self.next_delta: Callable[[], Awaitable[Delta]] = self._gen.__anext__

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Delta:
        return await self._gen.__anext__()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._gen.aclose()
        # A generation closed before it was ever iterated never entered _run's cleanup.
        if not self._lifecycle.finished:
            self._stream.cancel()
            self._finish(Outcome.CANCELLED, 0, None)

    async def collect(self) -> tuple[str, Delta]:
        """The whole output text and the last delta (finish reason and usage)."""
        parts: list[str] = []
        last = Delta("")
        async for delta in self._gen:
            parts.append(delta.text)
            last = delta
        return "".join(parts), last

    def _finish(self, outcome: Outcome, output_tokens: int, exc: BaseException | None) -> None:
        if not self._lifecycle.finish(outcome, output_tokens):
            return
        if self._admission is not None:
            self._admission.release()
        if self._spans is not None:
            self._spans.end(outcome, output_tokens, self.migrations, exc)
        req = self.request
        if log.isEnabledFor(logging.DEBUG):
            # The request's scope (request id, spans) closed with the handler: name both explicitly.
            log.debug(
                "request %s %s: %d output tokens, %d migrations, %.1fms",
                req.endpoint.value,
                outcome.value,
                output_tokens,
                self.migrations,
                (time.perf_counter() - self._started) * 1000,
                extra=log_fields(self.request_id, self._spans.root if self._spans is not None else None),
            )
        series = self._metrics.model(req.model)
        series.active.dec()
        series.duration.observe(time.perf_counter() - self._started)
        series.detokenize_ms.observe(self._detok_s * 1000)
        if outcome is Outcome.FINISHED:
            self._metrics.count(req.model, req.endpoint.value, req.stream, "success")
        elif outcome is Outcome.CANCELLED:
            self._metrics.count(req.model, req.endpoint.value, req.stream, "cancelled", "cancelled")
            self._metrics.cancellations.labels(
                req.model, req.endpoint.value, "stream" if req.stream else "unary"
            ).inc()
        else:
            self._metrics.count(
                req.model, req.endpoint.value, req.stream, "error", error_type(exc) if exc else "internal"
            )

    async def _run(self) -> AsyncGenerator[Delta, None]:
        req = self.request
        series = self._metrics.model(req.model)
        matcher = StopStringMatcher(req.stop.stop_strings) if req.stop.stop_strings else None
        detok = self._detok
        hidden = self._hidden
        migratable = self._migration_limit > 0
        perf_counter = time.perf_counter
        output_tokens = 0
        # Every chunk's tokens so far, whichever worker made them: a migrated request continues
        # after them. Kept as the chunks' own sequences and joined only when the request moves.
        generated: list[Sequence[int]] = []
        # Workers whose stream of this request broke.
        lost: set[int] = set()
        # The current worker has sent nothing yet (its first token is news to the router).
        fresh = True
        reopen = False
        first_at = last_at = 0.0
        outcome: Outcome | None = None
        failure: BaseException | None = None
        prefix = self._prompt_text if req.echo and self._prompt_text else ""
        try:
            while True:
                try:
                    if reopen:
                        reopen = False
                        assert self._reroute is not None
                        so_far = [token for ids in generated for token in ids]
                        self._worker_id, self._stream = await self._reroute(so_far, frozenset(lost))
                    async for chunk in self._stream:
                        ids = chunk.token_ids
                        finish = chunk.finish_reason
                        if ids:
                            last_at = perf_counter()
                            if not output_tokens:
                                first_at = last_at
                                series.ttft.observe(first_at - self._started)
                            if fresh:
                                fresh = False
                                # A request done in its first chunk skips the call: finishing
                                # releases its prefill load as well.
                                if finish is None:
                                    self._lifecycle.first_token()
                            output_tokens += len(ids)
                            if migratable:
                                generated.append(ids)
                            if finish is FinishReason.STOP and ids[-1] in hidden:
                                # The token that stopped the request (EOS, a stop token id) is
                                # counted but never shown.
                                ids = ids[:-1]
                            text = detok.push(ids)
                            self._detok_s += perf_counter() - last_at
                        else:
                            text = ""
                        if finish is not None:
                            text += detok.flush()
                            if matcher is not None:
                                text, stopped = matcher.feed(text)
                                if not stopped:
                                    text += matcher.flush()
                                elif finish is FinishReason.LENGTH:
                                    # Tokens arrive batched: the chunk that hit the limit can hold
                                    # the stop string too, and then the output ended at the stop
                                    # string.
                                    finish = FinishReason.STOP
                        elif matcher is not None and text:
                            text, stopped = matcher.feed(text)
                            if stopped:
                                # Stop strings are the frontend's to apply: end the worker's
                                # request here.
                                self._stream.cancel()
                                finish = FinishReason.STOP
                        if finish is not None:
                            usage = chunk.usage
                            if usage is None or self.migrations:
                                # The last worker saw the earlier output as prompt.
                                cached = min(usage.cached_tokens, self.prompt_tokens) if usage else 0
                                usage = Usage(self.prompt_tokens, output_tokens, cached)
                            outcome = _OUTCOME_OF[finish]
                            self._observe_end(usage, output_tokens, first_at, last_at)
                            # Tell the router before handing out the last delta: the consumer may
                            # never come back for more.
                            self._finish(outcome, output_tokens, None)
                            yield Delta(prefix + text, finish, usage)
                            return
                        if text:
                            yield Delta(prefix + text)
                            prefix = ""
                    raise Unavailable("the worker ended the stream without finishing the request")
                except TokenyardError as exc:
                    if exc.code is grpc.StatusCode.DEADLINE_EXCEEDED and self._timeout:
                        raise timeout_error(self._timeout) from None
                    if self.migrations >= self._migration_limit or not worker_lost(exc):
                        raise
                    self._migrate(exc, output_tokens)
                    lost.add(self._worker_id)
                    fresh = True
                    max_tokens = req.stop.max_tokens
                    if max_tokens is not None and output_tokens >= max_tokens:
                        self._stream = _LengthReached()
                    else:
                        reopen = True
        except (asyncio.CancelledError, GeneratorExit):
            if outcome is None:
                outcome = Outcome.CANCELLED
            raise
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if outcome is not Outcome.FINISHED:
                self._stream.cancel()
            self._finish(outcome or Outcome.FAILED, output_tokens, failure)

    def _migrate(self, exc: TokenyardError, output_tokens: int) -> None:
        """Count one more move of this request; the broken call is given up for good."""
        self._stream.cancel()
        self.migrations += 1
        kind = "ongoing_request" if output_tokens else "new_request"
        self._metrics.migrations.labels(self.request.model, kind).inc()
        self._lifecycle.rerouted()
        log.warning(
            "request %s lost worker %d after %d tokens (%s); migrating (%d of at most %d)",
            self.request_id,
            self._worker_id,
            output_tokens,
            exc,
            self.migrations,
            self._migration_limit,
        )

    def _observe_end(self, usage: Usage, output_tokens: int, first_at: float, last_at: float) -> None:
        series = self._metrics.model(self.request.model)
        series.osl.observe(output_tokens)
        series.output_tokens.inc(output_tokens)
        series.cached.observe(usage.cached_tokens)
        if usage.prompt_tokens:
            series.hit_rate.observe(usage.cached_tokens / usage.prompt_tokens)
        if output_tokens > 1:
            series.itl.observe((last_at - first_at) / (output_tokens - 1))
