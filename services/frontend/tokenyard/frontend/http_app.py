"""The OpenAI-compatible HTTP surface (``/v1/...``) plus ``/health`` and ``/metrics``.

Streaming responses are Server-Sent Events: one ``data: {json}`` per delta and a final
``data: [DONE]``. The status line waits for the first delta, so that routing and worker errors
before any output still get their HTTP status (503, 529, ...); an error after that is sent as a
``data: {"error": ...}`` event. The server runs with handler cancellation: a client that closes
its connection cancels the handler, which cancels the worker call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from aiohttp import web
from opentelemetry.context import Context

from tokenyard.common import tracing
from tokenyard.common.errors import InvalidArgument, TokenyardError
from tokenyard.common.metrics import Metrics
from tokenyard.frontend.chat_output import ChatDelta, ChatOutputParser, merge, output_parser, parse_output
from tokenyard.frontend.connections import GuardedListener
from tokenyard.frontend.core import Frontend, Generation, new_request_id
from tokenyard.frontend.generation import Delta, Endpoint, GenerationRequest
from tokenyard.frontend.openai_api import (
    SSE_DONE,
    ResponseWriter,
    UnsupportedMediaType,
    check_content_type,
    error_body,
    parse_chat,
    parse_completion,
    reject_lone_surrogates,
    sse,
)
from tokenyard.frontend.readiness import Readiness
from tokenyard.frontend.responses_api import FunctionCall, ResponsesWriter, parse_responses

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpOptions:
    # What "every worker is busy" answers (RESOURCE_EXHAUSTED).
    overload_status: int = 529
    max_body_bytes: int = 32 * 1024 * 1024
    # Seconds a body may take to arrive once the headers did (a slow body holds a handler).
    body_timeout: float = 60.0


FRONTEND_KEY = web.AppKey("frontend", Frontend)
METRICS_KEY = web.AppKey("metrics", Metrics)
READY_KEY = web.AppKey("ready", list)
OPTIONS_KEY = web.AppKey("options", HttpOptions)
LISTENER_KEY = web.AppKey("listener", GuardedListener)
READINESS_KEY = web.AppKey("readiness", Readiness)

# The HTTP status of each domain error's gRPC code, with the OpenAI error "type". By code, not
# class: errors of other layers (a chat template's refusal) carry their code too.
_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    # 529 is what Dynamo (and Anthropic) answer when every worker is busy.
    grpc.StatusCode.RESOURCE_EXHAUSTED: (529, "overloaded_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.FAILED_PRECONDITION: (500, "internal_error"),
}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}


def http_status(exc: BaseException, overload_status: int = 529) -> tuple[int, str, str]:
    """``(status, type, message)`` for an error raised while serving a request."""
    if isinstance(exc, UnsupportedMediaType):
        return 415, "invalid_request_error", str(exc)
    if isinstance(exc, TokenyardError) and exc.code in _STATUS:
        status, kind = _STATUS[exc.code]
        if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            status = overload_status
        return status, kind, str(exc) or kind
    return 500, "internal_error", "internal error"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response(error_body(status, message, kind), status=status)


def _error_from(exc: BaseException, request: web.Request) -> web.Response:
    status, kind, message = http_status(exc, request.app[OPTIONS_KEY].overload_status)
    return _error(status, message, kind)


def _trace_parent(request: web.Request) -> Context | None:
    """The caller's W3C trace context, looked at only when tracing is on."""
    return tracing.extract_from_headers(request.headers) if tracing.tracer() is not None else None


class BodyTimeout(Exception):
    """The request body did not arrive in time (408)."""


async def _json_body(request: web.Request) -> object:
    try:
        async with asyncio.timeout(request.app[OPTIONS_KEY].body_timeout):
            raw = await request.read()
    except TimeoutError:
        raise BodyTimeout from None
    # After the read: a body over the size limit is a 413 whatever it is labelled.
    check_content_type(request.headers.get("Content-Type"))
    if not raw:
        raise InvalidArgument("the request body is empty; expected a JSON object")
    try:
        # Strict UTF-8 (json.loads of bytes would let encoded surrogates through).
        doc = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("the request body is nested too deeply") from None
    reject_lone_surrogates(raw, doc)
    return doc


Parser = Callable[[object], tuple[GenerationRequest, bool]]


def _generate_handler(
    endpoint: Endpoint, parse: Parser
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        frontend = request.app[FRONTEND_KEY]
        gen_request: GenerationRequest | None = None
        try:
            gen_request, include_usage = parse(await _json_body(request))
        except TokenyardError as exc:
            frontend.count_failure(None, exc, endpoint.value)
            return _error_from(exc, request)
        request_id = new_request_id()
        try:
            generation = await frontend.start(gen_request, request_id, _trace_parent(request))
        except TokenyardError as exc:
            return _error_from(exc, request)
        writer = ResponseWriter(endpoint, request_id, gen_request.model, include_usage)
        # Chat output may hold reasoning and tool calls, as the model's card says; completions is text.
        card = generation.card if endpoint is Endpoint.CHAT_COMPLETIONS else None
        async with generation:
            if not gen_request.stream:
                try:
                    text, last = await generation.collect()
                except TokenyardError as exc:
                    return _error_from(exc, request)
                if card is not None:
                    doc = writer.full_parts(*parse_output(card, gen_request, text), last)
                else:
                    doc = writer.full(text, last)
                return web.json_response(doc, dumps=_dumps)
            try:
                opened = await _open_stream(request, generation)
                if isinstance(opened, web.Response):
                    return opened
                first, response = opened
                parser = output_parser(card, gen_request) if card is not None else None
                options = request.app[OPTIONS_KEY]
                events: _Events = (
                    _ChunkEvents(writer, options)
                    if parser is None
                    else _ParsedChatEvents(writer, parser, options)
                )
                await _sse(response, generation, first, events)
            except ConnectionResetError:
                # The client left mid-stream; leaving the block cancels the worker call.
                frontend.client_disconnected()
            return response

    return handle


async def _open_stream(
    request: web.Request, generation: Generation
) -> tuple[Delta, web.StreamResponse] | web.Response:
    """The first delta and the SSE response, its headers sent. The status line waits for the first
    delta, so an error before any output is still an HTTP status (that response is returned)."""
    try:
        first = await generation.__anext__()
    except TokenyardError as exc:
        return _error_from(exc, request)
    response = _EventStream(headers=_SSE_HEADERS)
    await response.prepare(request)
    return first, response


class _EventStream(web.StreamResponse):
    # The first event is ready when the stream opens: let the headers leave with it in one
    # write instead of two (aiohttp's own Response does the same).
    _send_headers_immediately = False


class _Events(Protocol):
    """How one surface writes a generation as events: the one SSE loop (:func:`_sse`) asks it for
    the bytes of each delta, of the last one, or of a failure after the status line left."""

    # Written after the last delta's or the failure's bytes, in the same write.
    end: bytes

    def event(self, delta: Delta) -> bytes: ...

    def last(self, delta: Delta) -> bytes: ...

    def failure(self, exc: TokenyardError) -> bytes: ...


async def _sse(response: web.StreamResponse, generation: Generation, first: Delta, events: _Events) -> None:
    """Write a generation's deltas as they come, then its end: the one streaming loop of every
    HTTP surface (chat and completions chunks, parsed chat chunks, Responses events)."""
    delta = first
    write = response.write
    event = events.event
    next_delta = generation.next_delta
    try:
        while delta.finish_reason is None:
            out = event(delta)
            if out:
                await write(out)
            delta = await next_delta()
        tail = events.last(delta)
    except TokenyardError as exc:
        # The status line is long gone: the error becomes an event, then the stream ends.
        tail = events.failure(exc)
    # The last events, the trailer and the end of the chunked body leave in one write.
    await response.write_eof(tail + events.end)


class _ChunkEvents:
    """Chat and completions chunks, one per delta, then ``data: [DONE]``."""

    end = SSE_DONE

    def __init__(self, writer: ResponseWriter, options: HttpOptions) -> None:
        self._writer = writer
        self._options = options
        self.event = writer.chunk

    def last(self, delta: Delta) -> bytes:
        tail = self._writer.chunk(delta)
        if self._writer.include_usage and delta.usage is not None:
            tail += self._writer.usage_chunk(delta.usage)
        return tail

    def failure(self, exc: TokenyardError) -> bytes:
        status, kind, message = http_status(exc, self._options.overload_status)
        return sse(error_body(status, message, kind))


class _ParsedChatEvents(_ChunkEvents):
    """Chat chunks of an output split into content, reasoning and tool calls."""

    def __init__(self, writer: ResponseWriter, parser: ChatOutputParser, options: HttpOptions) -> None:
        super().__init__(writer, options)
        self._parser = parser
        self.event = self._event

    def _event(self, delta: Delta) -> bytes:
        part = self._parser.feed(delta.text)
        return self._writer.chunk_parts(part, None, False) if part else b""

    def last(self, delta: Delta) -> bytes:
        part = merge(self._parser.feed(delta.text), self._parser.flush())
        tail = self._writer.chunk_parts(part, delta.finish_reason, self._parser.tool_call_count > 0)
        if self._writer.include_usage and delta.usage is not None:
            tail += self._writer.usage_chunk(delta.usage)
        return tail


class _ResponsesEvents:
    """Responses API events: text (or parsed reasoning and function calls), then the final
    ``response.completed`` (or ``response.failed``); this surface has no ``[DONE]``."""

    end = b""

    def __init__(
        self, writer: ResponsesWriter, parser: ChatOutputParser | None, options: HttpOptions
    ) -> None:
        self._writer = writer
        self._parser = parser
        self._options = options

    def event(self, delta: Delta) -> bytes:
        if self._parser is None:
            return self._writer.text(delta.text)
        return _response_events(self._writer, self._parser.feed(delta.text))

    def last(self, delta: Delta) -> bytes:
        if self._parser is None:
            out = self._writer.text(delta.text)
        else:
            out = _response_events(self._writer, merge(self._parser.feed(delta.text), self._parser.flush()))
        return out + self._writer.finish(delta.finish_reason, delta.usage)

    def failure(self, exc: TokenyardError) -> bytes:
        _, kind, message = http_status(exc, self._options.overload_status)
        return self._writer.fail(kind, message)


def _response_events(writer: ResponsesWriter, part: ChatDelta) -> bytes:
    out = writer.reasoning(part.reasoning) + writer.text(part.content)
    for call in part.tool_calls:
        # The parser hands over whole calls: id, name and arguments in one delta.
        out += writer.function_call(FunctionCall(call.id or "", call.name or "", call.arguments))
    return out


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: the whole response object, or its events when ``stream`` is set."""
    frontend = request.app[FRONTEND_KEY]
    options = request.app[OPTIONS_KEY]
    try:
        parsed = parse_responses(await _json_body(request))
    except TokenyardError as exc:
        frontend.count_failure(None, exc, Endpoint.RESPONSES.value)
        return _error_from(exc, request)
    request_id = new_request_id()
    try:
        generation = await frontend.start(parsed.generation, request_id, _trace_parent(request))
    except TokenyardError as exc:
        return _error_from(exc, request)
    writer = ResponsesWriter(parsed, request_id)
    card = generation.card
    async with generation:
        if not parsed.body.stream:
            try:
                text, last = await generation.collect()
            except TokenyardError as exc:
                return _error_from(exc, request)
            content, reasoning, calls = (
                parse_output(card, parsed.generation, text) if card is not None else (text, "", [])
            )
            functions = [FunctionCall(c.id, c.name, c.arguments) for c in calls]
            doc = writer.full(content, reasoning, functions, last.finish_reason, last.usage)
            return web.json_response(doc, dumps=_dumps)
        try:
            opened = await _open_stream(request, generation)
            if isinstance(opened, web.Response):
                return opened
            first, response = opened
            await response.write(writer.start())
            parser = output_parser(card, parsed.generation) if card is not None else None
            await _sse(response, generation, first, _ResponsesEvents(writer, parser, options))
        except ConnectionResetError:
            frontend.client_disconnected()
        return response


def _dumps(doc: object) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


async def health(request: web.Request) -> web.Response:
    ready = bool(request.app[READY_KEY][0])
    models = sorted(request.app[FRONTEND_KEY].models.models())
    body = {"status": "healthy" if ready else "starting", "models": models}
    return web.json_response(body, status=200 if ready else 503)


async def health_live(request: web.Request) -> web.Response:
    """Liveness: the process runs and its event loop answers; nothing else is checked, so that an
    orchestrator restarts a frontend only when restarting can help."""
    return web.json_response({"status": "live"})


async def health_ready(request: web.Request) -> web.Response:
    """Readiness: serving, and some router and some worker answer (503 otherwise, with why)."""
    if not request.app[READY_KEY][0]:
        return web.json_response({"ready": False, "reason": "starting or stopping"}, status=503)
    readiness = request.app.get(READINESS_KEY)
    if readiness is None:
        return web.json_response({"ready": True})
    state = await readiness.state()
    body: dict[str, object] = {"ready": state.ready, "routers": state.routers, "workers": state.workers}
    if state.reason:
        body["reason"] = state.reason
    return web.json_response(body, status=200 if state.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    data, content_type = request.app[METRICS_KEY].render()
    # aiohttp wants the charset apart from the mime type.
    return web.Response(body=data, headers={"Content-Type": content_type})


async def list_models(request: web.Request) -> web.Response:
    now = int(time.time())
    cards = request.app[FRONTEND_KEY].models.models()
    data = [
        {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "tokenyard",
            "max_model_len": card.context_length,
        }
        for name, card in sorted(cards.items())
    ]
    return web.json_response({"object": "list", "data": data})


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (no such path, a wrong method, a body over the size limit) and
    unexpected ones in the OpenAI shape."""
    try:
        return await handler(request)
    except BodyTimeout:
        limit = request.app[OPTIONS_KEY].body_timeout
        response = _error(
            408,
            f"the request body did not arrive within {limit:g}s "
            "(--http-body-timeout / TOKENYARD_FRONTEND_HTTP_BODY_TIMEOUT)",
        )
        response.force_close()
        return response
    except asyncio.CancelledError:
        # The client closed its connection (the server runs with handler cancellation).
        request.app[FRONTEND_KEY].client_disconnected()
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            limit = request.app[OPTIONS_KEY].max_body_bytes
            return _error(
                413,
                f"the request body is larger than this server accepts ({limit} bytes, "
                "--max-body-bytes / TOKENYARD_FRONTEND_MAX_BODY_BYTES)",
            )
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return _error(exc.status, f"{exc.reason}: {request.method} {request.path}", kind)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return _error(500, "internal error", "internal_error")


@web.middleware
async def _connection_marks(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Tells the connection's guard that a request is in progress: its head has arrived (the
    header timer stops) and, until it ends, the connection is not idle."""
    guard = request.app[LISTENER_KEY].guard_of(request.transport)
    if guard is None:
        return await handler(request)
    guard.request_started()
    try:
        return await handler(request)
    finally:
        guard.request_ended()


def build_app(
    frontend: Frontend,
    metrics_: Metrics,
    ready: list[bool],
    options: HttpOptions | None = None,
    *,
    listener: GuardedListener | None = None,
    readiness: Readiness | None = None,
) -> web.Application:
    options = options or HttpOptions()
    middlewares = [_errors] if listener is None else [_connection_marks, _errors]
    app = web.Application(client_max_size=options.max_body_bytes, middlewares=middlewares)
    app[FRONTEND_KEY] = frontend
    app[METRICS_KEY] = metrics_
    app[READY_KEY] = ready
    app[OPTIONS_KEY] = options
    if listener is not None:
        app[LISTENER_KEY] = listener
    if readiness is not None:
        app[READINESS_KEY] = readiness
    # /health (and /live) keep their meaning: this frontend is up and taking requests.
    app.router.add_get("/health", health)
    app.router.add_get("/live", health)
    app.router.add_get("/health/live", health_live)
    app.router.add_get("/health/ready", health_ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", _generate_handler(Endpoint.COMPLETIONS, parse_completion))
    app.router.add_post("/v1/chat/completions", _generate_handler(Endpoint.CHAT_COMPLETIONS, parse_chat))
    app.router.add_post("/v1/responses", responses)
    return app
