"""Parsing of discovery URLs, with errors that say what a good one looks like."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from tokenyard.common.discovery.errors import DiscoveryError

_EXAMPLES = "redis://host:port/db, dir:///abs/path, file:///abs/path, a plain path, or memory://name"
_SCHEMES = ("redis", "rediss", "dir", "file", "memory")


@dataclass(frozen=True, slots=True)
class DiscoveryUrl:
    kind: Literal["redis", "directory", "memory"]
    target: str  # the Redis URL, the absolute directory path, or the memory store's name


def redact(url: str) -> str:
    """``url`` with any password replaced, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def parse_discovery_url(url: str) -> DiscoveryUrl:
    if not isinstance(url, str) or not url.strip():
        raise DiscoveryError(f"empty discovery URL; use {_EXAMPLES}")
    if url != url.strip():
        raise DiscoveryError(f"discovery URL {url!r} has surrounding spaces")
    scheme, sep, _ = url.partition(":")
    if "://" not in url and not (sep and scheme.lower() in _SCHEMES):
        return DiscoveryUrl("directory", os.path.abspath(os.path.expanduser(url)))
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise DiscoveryError(f"malformed discovery URL {redact(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss"):
        return _parse_redis(url, parts.hostname, parts.path, parts.query, parts.fragment)
    if scheme in ("dir", "file"):
        return _parse_directory(url, parts.netloc, parts.path, parts.query, parts.fragment)
    if scheme == "memory":
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise DiscoveryError(f"discovery URL {url!r}: use memory:// or memory://name")
        return DiscoveryUrl("memory", parts.netloc)
    raise DiscoveryError(
        f"unsupported discovery URL scheme {parts.scheme!r} in {redact(url)!r}; use {_EXAMPLES}"
    )


def _parse_redis(url: str, host: str | None, path: str, query: str, fragment: str) -> DiscoveryUrl:
    shown = redact(url)
    if not host:
        raise DiscoveryError(f"discovery URL {shown!r} names no host; use redis://host:port/db")
    try:
        urlsplit(url).port  # noqa: B018 - validates the port
    except ValueError:
        raise DiscoveryError(
            f"discovery URL {shown!r} has an invalid port; use redis://host:port/db"
        ) from None
    db = path.strip("/")
    if db and not (db.isdigit() and int(db) < 2**31):
        raise DiscoveryError(
            f"discovery URL {shown!r}: database {db!r} is not a number; use redis://host:port/db"
        )
    if fragment:
        raise DiscoveryError(f"discovery URL {shown!r} must not have a #fragment")
    del query  # connection options in the query string are passed to the Redis client as they are
    return DiscoveryUrl("redis", url)


def _parse_directory(url: str, netloc: str, path: str, query: str, fragment: str) -> DiscoveryUrl:
    if netloc not in ("", "localhost"):
        raise DiscoveryError(
            f"discovery URL {url!r} names host {netloc!r}; a directory URL takes an absolute path: dir:///abs/path"
        )
    if query or fragment:
        raise DiscoveryError(f"discovery URL {url!r} must not have a query or fragment")
    path = unquote(path)
    if not path.startswith("/") or path == "/":
        raise DiscoveryError(f"discovery URL {url!r} needs an absolute directory path: dir:///abs/path")
    return DiscoveryUrl("directory", os.path.normpath(path))
