"""The discovery plane: every service registers an :class:`Instance` under a lease and watches the others.

Backends: Redis (compose, Kubernetes), a directory of lease files (several processes on one host),
and process memory (unit tests). Pick one with :func:`open_discovery`.
"""

from tokenyard.common.discovery.base import (
    Discovery,
    WatchEvent,
    WatchEventKind,
    default_discovery_dir,
    open_discovery,
)
from tokenyard.common.discovery.errors import DiscoveryError, InvalidRecordError
from tokenyard.common.discovery.records import MODEL_ROLES, Instance, Metadata, ModelCard, new_instance_id
from tokenyard.common.discovery.url import DiscoveryUrl, parse_discovery_url

__all__ = [
    "MODEL_ROLES",
    "Discovery",
    "DiscoveryError",
    "DiscoveryUrl",
    "Instance",
    "InvalidRecordError",
    "Metadata",
    "ModelCard",
    "WatchEvent",
    "WatchEventKind",
    "default_discovery_dir",
    "new_instance_id",
    "open_discovery",
    "parse_discovery_url",
]
