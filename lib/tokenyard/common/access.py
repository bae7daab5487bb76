"""Who may call what: RPC access by the identity in the peer's certificate (mTLS).

With TLS on, a server has already refused every client without a certificate of the deployment's
CA during the handshake. This interceptor then lets a call through only when the certificate's
identity (``spiffe://tokenyard/<identity>``) is allowed for that RPC by :data:`RULES`:

* each RPC lists the services that call it in a deployment (the worker's ``Generate`` is the
  frontend's, its KV event stream the router's, ``FetchKvBlocks`` another worker's);
* ``admin`` (the operator's certificate) may call everything; admin RPCs (``Drain``, the router's
  ``Dump``, the planner's RPCs) are allowed to nothing else, except the planner's ``Drain`` of the
  workers it scales down;
* health checks and reflection are open to any certificate of the CA (probes use their own);
* an RPC missing from the table is refused: a new RPC is closed until it is listed here.

A peer without a verified identity gets UNAUTHENTICATED, one with the wrong identity
PERMISSION_DENIED, both with a message naming the RPC and the identities it accepts.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from grpc.aio import ServicerContext

from tokenyard.common.certs import ADMIN
from tokenyard.common.handlers import rebuild
from tokenyard.common.tls import peer_identity

log = logging.getLogger(__name__)

ANY = "*"  # any certificate of the deployment's CA

_WORKER = "/tokenyard.api.worker.v1.WorkerService/"
_ROUTER = "/tokenyard.api.router.v1.RouterService/"
_PLANNER = "/tokenyard.api.planner.v1.PlannerService/"

RULES: Mapping[str, frozenset[str]] = {
    # Worker: frontends send work, routers follow its KV cache and load, planners its steps,
    # decode workers pull KV blocks from prefill workers.
    _WORKER + "Generate": frozenset({"frontend"}),
    _WORKER + "GenerateMux": frozenset({"frontend"}),
    _WORKER + "SubscribeKvEvents": frozenset({"router"}),
    _WORKER + "SubscribeForwardPassMetrics": frozenset({"planner", "router"}),
    _WORKER + "GetLoad": frozenset({"router", "planner", "frontend"}),
    _WORKER + "Describe": frozenset({"router", "planner", "frontend"}),
    _WORKER + "FetchKvBlocks": frozenset({"worker"}),
    _WORKER + "Drain": frozenset({"planner"}),
    # Router: frontends route and report request lifecycles; replicas share decisions.
    _ROUTER + "Route": frozenset({"frontend"}),
    _ROUTER + "NotifyFirstToken": frozenset({"frontend"}),
    _ROUTER + "NotifyFinished": frozenset({"frontend"}),
    _ROUTER + "StreamNotifications": frozenset({"frontend"}),
    _ROUTER + "QueryOverlap": frozenset({"frontend"}),
    _ROUTER + "SubscribeReplicaEvents": frozenset({"router"}),
    _ROUTER + "Dump": frozenset(),
    # Planner: read by operators only.
    _PLANNER + "GetDecision": frozenset(),
    _PLANNER + "GetStatus": frozenset(),
    _PLANNER + "ListDecisions": frozenset(),
}
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def allowed(method: str, identity: str | None, rules: Mapping[str, frozenset[str]] = RULES) -> bool:
    """Whether a peer with ``identity`` (None: no verified certificate) may call ``method``."""
    if identity is None:
        return False
    if identity == ADMIN or method.startswith(_OPEN_PREFIXES):
        return True
    callers = rules.get(method)
    return callers is not None and (identity in callers or ANY in callers)


def accepted(method: str, rules: Mapping[str, frozenset[str]] = RULES) -> str:
    """The identities ``method`` accepts, for refusal messages."""
    if method.startswith(_OPEN_PREFIXES):
        return "any certificate of the deployment's CA"
    return ", ".join(sorted({*rules.get(method, ()), ADMIN}))


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls whose peer certificate does not name an identity allowed for the RPC."""

    def __init__(self, service: str, rules: Mapping[str, frozenset[str]] = RULES) -> None:
        self._service = service
        self._rules = rules

    async def _check(self, method: str, context: ServicerContext[Any, Any]) -> None:
        identity = peer_identity(context.auth_context())
        if allowed(method, identity, self._rules):
            return
        if identity is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs a client certificate of this deployment's CA naming a tokenyard service",
            )
        log.warning("refused %s from %s (%s) on %s", method, identity, context.peer(), self._service)
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} is not open to {identity!r} certificates (accepted: {accepted(method, self._rules)})",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._wrap(handler, handler_call_details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        check = self._check

        def unary_response(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def run(request_or_iterator: Any, context: ServicerContext[Any, Any]) -> Any:
                await check(method, context)
                return await behavior(request_or_iterator, context)

            return run

        def stream_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run_gen(
                request_or_iterator: Any, context: ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await check(method, context)
                async for item in behavior(request_or_iterator, context):
                    yield item

            return run_gen

        return rebuild(handler, unary_response, stream_response)
