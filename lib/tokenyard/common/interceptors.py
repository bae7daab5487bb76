"""The server interceptor every service installs.

One place does what every RPC needs: carry the request id (``x-request-id`` metadata, generated
when absent) into the logging context, open a span when tracing is on, count and time the RPC,
and map exceptions to gRPC statuses:

* :class:`~tokenyard.common.errors.TokenyardError` subclasses become their own status code with
  their message;
* anything else becomes INTERNAL with a generic message naming the request id, and its traceback
  is logged exactly once, here.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc.aio import AbortError, ServicerContext
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from tokenyard.common import tracing
from tokenyard.common.errors import TokenyardError, status_of
from tokenyard.common.handlers import rebuild
from tokenyard.common.logs import request_id_var
from tokenyard.common.metrics import Metrics

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# Health and reflection are polled constantly; counting them would drown the real traffic.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def loggable_id(text: str) -> str:
    """A request id from a peer as logs may carry it: short and printable ("" if nothing is left)."""
    return "".join(c for c in text[:64] if c.isprintable())


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            return loggable_id(text) or uuid.uuid4().hex[:16]
    return uuid.uuid4().hex[:16]


class _Call:
    """Book-keeping of one RPC: request id, span, metrics and the status it ended with."""

    __slots__ = ("_span_cm", "_token", "code", "method", "metrics", "service", "started")

    def __init__(self, method: str, details: grpc.HandlerCallDetails, metrics: Metrics | None, service: str):
        self.method = method
        self.metrics = metrics
        self.service = service
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()
        self._token = request_id_var.set(_request_id(details.invocation_metadata))
        self._span_cm: Any = None
        tracer = tracing.tracer()
        if tracer is not None:
            ctx = tracing.extract_from_metadata(details.invocation_metadata)
            self._span_cm = tracer.start_as_current_span(method, context=ctx, kind=SpanKind.SERVER)
            self._span_cm.__enter__()
        if metrics is not None:
            metrics.rpc_in_flight.labels(service).inc()

    async def fail(self, exc: BaseException, context: ServicerContext[Any, Any]) -> None:
        code, message = status_of(exc)
        if not isinstance(exc, TokenyardError):
            log.exception("unhandled error in %s", self.method)
        self.code = code
        await context.abort(code, message)

    def finish(self, context: ServicerContext[Any, Any] | None = None) -> None:
        if context is not None and self.code == grpc.StatusCode.OK:
            code = context.code()
            if isinstance(code, grpc.StatusCode):
                self.code = code
        elapsed = time.perf_counter() - self.started
        # One line per RPC, inside its span so that it carries the trace id (debug: a busy
        # deployment serves thousands a second).
        log.debug("rpc %s %s %.1fms", self.method, self.code.name, elapsed * 1000)
        if self._span_cm is not None:
            span = trace.get_current_span()
            if self.code != grpc.StatusCode.OK:
                span.set_attribute("rpc.grpc.status_code", self.code.value[0])
            self._span_cm.__exit__(None, None, None)
        if self.metrics is not None:
            self.metrics.rpc_in_flight.labels(self.service).dec()
            self.metrics.rpc_requests.labels(self.service, self.method, self.code.name).inc()
            self.metrics.rpc_duration.labels(self.service, self.method).observe(elapsed)
        # A server stream whose client vanished (a killed peer) is closed by the event loop's
        # async-generator finalizer, in a context of its own: there is nothing to restore there.
        with contextlib.suppress(ValueError):
            request_id_var.reset(self._token)


class ServiceInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, service: str, metrics: Metrics | None = None) -> None:
        self._service = service
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_QUIET_PREFIXES):
            return handler
        return self._wrap(handler, handler_call_details)

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        metrics, service, method = self._metrics, self._service, details.method

        def unary_response(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def run(request_or_iterator: Any, context: ServicerContext[Any, Any]) -> Any:
                call = _Call(method, details, metrics, service)
                try:
                    return await behavior(request_or_iterator, context)
                except AbortError:
                    raise
                except Exception as exc:
                    await call.fail(exc, context)
                finally:
                    call.finish(context)

            return run

        def stream_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run_gen(
                request_or_iterator: Any, context: ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                call = _Call(method, details, metrics, service)
                try:
                    async for item in behavior(request_or_iterator, context):
                        yield item
                except AbortError:
                    raise
                except Exception as exc:
                    await call.fail(exc, context)
                finally:
                    call.finish(context)

            return run_gen

        return rebuild(handler, unary_response, stream_response)


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for an outbound call: the current request id and W3C trace context."""
    pairs = [(REQUEST_ID_KEY, request_id_var.get())] if request_id_var.get() != "-" else []
    pairs.extend(tracing.inject_headers().items())
    return tuple(pairs)
