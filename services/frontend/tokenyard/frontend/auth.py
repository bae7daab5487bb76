"""Client authentication on both surfaces: API keys in ``Authorization: Bearer <key>``.

OpenAI HTTP answers a missing or wrong key with 401 and an OpenAI error body
(``invalid_api_key``); KServe gRPC with UNAUTHENTICATED. Probes and scrapes (``/health...``,
``/live``, ``/metrics``, gRPC health, reflection, KServe ServerLive and ServerReady) stay open unless ``--auth-probes`` asks for a
key there too. With no key configured nothing is checked.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from tokenyard.common.api_keys import ApiKeys
from tokenyard.common.handlers import rebuild

log = logging.getLogger(__name__)

_OPEN_HTTP_PATHS = ("/health", "/live", "/metrics")
# KServe's liveness and readiness are probes too (tritonclient's is_server_live / is_server_ready).
_OPEN_GRPC_PREFIXES = (
    "/grpc.health.v1.",
    "/grpc.reflection.",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
_MESSAGE = "a valid API key is required: send it as 'Authorization: Bearer <key>'"


def _open_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in _OPEN_HTTP_PATHS)


def http_middleware(keys: ApiKeys, protect_probes: bool) -> Any:
    @web.middleware
    async def authenticate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if (protect_probes or not _open_path(request.path)) and not keys.authorized(
            request.headers.get("Authorization")
        ):
            body = {
                "error": {
                    "message": _MESSAGE,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
            return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return authenticate


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """UNAUTHENTICATED for KServe calls without a valid key in their ``authorization`` metadata."""

    def __init__(self, keys: ApiKeys, protect_probes: bool) -> None:
        self._keys = keys
        self._protect_probes = protect_probes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if not self._protect_probes and handler_call_details.method.startswith(_OPEN_GRPC_PREFIXES):
            return handler
        if self._keys.authorized(_authorization(handler_call_details.invocation_metadata)):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape that only refuses, without parsing the request.

    No request deserializer: gRPC hands the handler the raw bytes, so an unauthenticated client
    cannot make the frontend parse a message (up to the body limit) only to be refused."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)

    async def deny_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)
        yield  # pragma: no cover - abort raises

    return rebuild(handler, lambda _: deny, lambda _: deny_stream, parse_requests=False)
