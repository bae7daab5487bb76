"""Rebuilding a gRPC method handler around its behaviour, for server interceptors.

A ``grpc.RpcMethodHandler`` comes in four kinds (unary or streaming request, unary or streaming
response) and a wrapped behaviour must keep its handler's kind and serializers. What differs
between interceptors is only the wrapping: around a behaviour that answers once (a coroutine, which
is also how a streaming handler that writes with ``context.write()`` is written), or around an
async generator. This module holds the four-way rebuild once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

Behavior = Callable[..., Any]
Wrap = Callable[[Behavior], Behavior]


def rebuild(
    handler: grpc.RpcMethodHandler[Any, Any],
    once: Wrap,
    generator: Wrap,
    *,
    parse_requests: bool = True,
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler``'s kind and serializers, with its behaviour replaced by ``once(behaviour)`` when
    the behaviour is a coroutine function and by ``generator(behaviour)`` when it is an async
    generator function. ``parse_requests`` False drops the request deserializer: the new behaviour
    gets raw bytes (a refusal need not parse what it refuses)."""

    def wrap(behavior: Behavior) -> Behavior:
        return generator(behavior) if inspect.isasyncgenfunction(behavior) else once(behavior)

    serde: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer if parse_requests else None,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **serde)
    assert handler.stream_stream is not None, "a method handler of none of the four kinds"
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **serde)
