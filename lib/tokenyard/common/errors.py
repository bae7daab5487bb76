"""Domain errors and their gRPC status codes.

Services raise these; :func:`status_of` turns them into statuses (for the server interceptor, and
for the per-stream errors of a multiplexed call); clients turn an ``RpcError`` back into the
matching class with :func:`from_rpc_error` (or :func:`from_status`). Errors never travel as fields
in responses, except for a multiplexed stream's status, which has no call of its own.
"""

from __future__ import annotations

import grpc

from tokenyard.common.logs import request_id_var


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


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a request that raised ``exc`` ends with.

    A domain error keeps its code and message. Anything else is a bug whose text may hold internals
    (paths, addresses, data): the client gets INTERNAL with a generic message naming the request id
    (the current log context), under which the caller logs the traceback.
    """
    if isinstance(exc, TokenyardError):
        return exc.code, str(exc) or exc.code.name
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()})"
