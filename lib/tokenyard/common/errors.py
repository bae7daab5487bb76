"""Domain errors and their gRPC status codes.

Services raise these; one server interceptor turns them into statuses; clients turn an
``RpcError`` back into the matching class with :func:`from_rpc_error`. Errors never travel as
fields in responses.
"""

from __future__ import annotations

import grpc


class TokenyardError(Exception):
    """Base of all domain errors. ``code`` is the gRPC status the client sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(TokenyardError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TokenyardError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TokenyardError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TokenyardError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(TokenyardError):
    """Every eligible worker is busy: retry later (HTTP 529 at the frontend)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TokenyardError):
    """No usable instance at all (HTTP 503 at the frontend)."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(TokenyardError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(TokenyardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(TokenyardError):
    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[TokenyardError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Overloaded,
        Unavailable,
        Cancelled,
        DeadlineExceeded,
        Unimplemented,
    )
}


def from_rpc_error(err: grpc.RpcError) -> TokenyardError:
    """The domain error matching a failed call (INTERNAL and unknown codes give TokenyardError)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details)


def from_status(code: grpc.StatusCode, details: str | None) -> TokenyardError:
    """The domain error of a status carried in a message rather than as a call's status."""
    return _BY_CODE.get(code, TokenyardError)(details or code.name)
