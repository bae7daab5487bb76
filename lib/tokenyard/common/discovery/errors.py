"""Errors of the discovery plane."""

from __future__ import annotations


class DiscoveryError(Exception):
    """Discovery is unusable: a bad URL, an unreachable backend, a malformed record.

    Messages are one line and name the URL or setting involved, so that callers can print them as is.
    """


class InvalidRecordError(DiscoveryError, ValueError):
    """A record (or a value meant for one) breaks the schema; also a ``ValueError`` for constructors."""
