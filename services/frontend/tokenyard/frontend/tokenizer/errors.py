"""Errors of the tokenizer layer, carrying the gRPC status (and so the HTTP status) they map to."""

from __future__ import annotations

import grpc

from tokenyard.common.errors import TokenyardError


class TokenizerError(TokenyardError):
    """A tokenizer could not be found, read or built: the deployment is misconfigured."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ChatTemplateError(TokenizerError):
    """The chat template rejected the conversation (or failed on it): the request is at fault."""

    code = grpc.StatusCode.INVALID_ARGUMENT
