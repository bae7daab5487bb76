"""The client side of the memory service (gms): connect under a lock, allocate, map, publish.

:class:`GmsClient` holds one lock session (its Lock call is the lock: a process that dies
releases it); :mod:`tokenyard.common.gms.tensors` turns a layout into torch tensors without
copying and imports torch only there, so that services without torch can use the rest.
"""

from tokenyard.common.gms.client import GmsClient, event_history, get_info
from tokenyard.common.gms.paths import default_socket, fd_socket_path
from tokenyard.common.gms.types import (
    Allocation,
    GmsInfo,
    Layout,
    LockEvent,
    LockMode,
    LockState,
    LockTransition,
    MemoryTag,
    MetadataEntry,
    SessionInfo,
)

__all__ = [
    "Allocation",
    "GmsClient",
    "GmsInfo",
    "Layout",
    "LockEvent",
    "LockMode",
    "LockState",
    "LockTransition",
    "MemoryTag",
    "MetadataEntry",
    "SessionInfo",
    "default_socket",
    "event_history",
    "fd_socket_path",
    "get_info",
]
