"""The discovery interface every service programs against, and the factory that picks a backend."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from tokenyard.common.discovery.errors import DiscoveryError
from tokenyard.common.discovery.records import Instance
from tokenyard.common.discovery.url import DiscoveryUrl, parse_discovery_url

__all__ = [
    "DEFAULT_TTL",
    "Discovery",
    "DiscoveryError",
    "WatchEvent",
    "WatchEventKind",
    "default_discovery_dir",
    "open_discovery",
]


DEFAULT_TTL = 10.0  # seconds; the lease of every service unless configured otherwise


class WatchEventKind(Enum):
    ADDED = "added"
    UPDATED = "updated"  # same instance id, different record (re-registered with new details)
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: WatchEventKind
    instance: Instance


class Discovery(Protocol):
    """A registry of instances under leases.

    A registered record lives as long as its lease, which a background heartbeat renews; a process that
    dies without deregistering disappears within the lease TTL (for watchers, within TTL plus the
    backend's resync interval).
    """

    async def register(self, instance: Instance) -> None:
        """Publish ``instance`` and keep its lease alive until :meth:`deregister` or :meth:`close`."""
        ...

    async def deregister(self, instance_id: int) -> None:
        """Remove the record at once and stop renewing its lease."""
        ...

    async def instances(self, service: str | None = None) -> list[Instance]:
        """The live instances, of one service or of all."""
        ...

    def watch(self, service: str | None = None) -> AsyncIterator[WatchEvent]:
        """``ADDED`` for every current instance, then every change, until the client is closed."""
        ...

    async def close(self) -> None:
        """Deregister what this client registered and stop its background tasks."""
        ...


def default_discovery_dir() -> Path:
    """Where ``tokenyard up`` and its processes meet when nothing else is configured.

    ``$TOKENYARD_HOME/discovery`` when set; else under ``$XDG_RUNTIME_DIR`` (per user, cleared at logout);
    else a per-uid folder in the temp directory, so that two users on one host do not see each other.
    That name is predictable: the directory backend creates it 0700 and refuses it when another user
    got there first (see ``discovery/directory.py``).
    """
    home = os.environ.get("TOKENYARD_HOME")
    if home:
        return Path(home).expanduser() / "discovery"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "tokenyard" / "discovery"
    return Path(tempfile.gettempdir()) / f"tokenyard-{os.getuid()}" / "discovery"


def open_discovery(url: str, *, ttl: float = DEFAULT_TTL, resync_interval: float | None = None) -> Discovery:
    """A discovery client for ``url``; no I/O happens until it is used.

    ``redis://host:port/db`` is Redis; ``dir:///abs/path``, ``file:///abs/path`` or a plain path is a
    directory of lease files; ``memory://`` or ``memory://name`` is process-local (tests only).
    ``ttl`` is the lease of what this client registers; ``resync_interval`` overrides how often watchers
    rescan the backend (Redis 1 s, directory 0.25 s, memory 0.05 s).
    """
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not ttl > 0:
        raise DiscoveryError(f"discovery lease TTL must be a positive number of seconds, got {ttl!r}")
    if resync_interval is not None and not resync_interval > 0:
        raise DiscoveryError(f"discovery resync interval must be positive, got {resync_interval!r}")
    parsed = parse_discovery_url(url)
    return _open(parsed, float(ttl), resync_interval)


def _open(parsed: DiscoveryUrl, ttl: float, resync_interval: float | None) -> Discovery:
    # Backends are imported on demand so that a process using a directory never imports redis.
    if parsed.kind == "redis":
        from tokenyard.common.discovery.redis_backend import RedisDiscovery

        return RedisDiscovery(parsed.target, ttl=ttl, resync_interval=resync_interval or 1.0)
    if parsed.kind == "directory":
        from tokenyard.common.discovery.directory import DirectoryDiscovery

        return DirectoryDiscovery(Path(parsed.target), ttl=ttl, poll_interval=resync_interval or 0.25)
    from tokenyard.common.discovery.memory import MemoryDiscovery

    return MemoryDiscovery(parsed.target, ttl=ttl, poll_interval=resync_interval or 0.05)
