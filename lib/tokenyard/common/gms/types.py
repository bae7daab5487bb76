"""The gms vocabulary, shared by the server's domain and the client library (no protobuf here)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class LockMode(StrEnum):
    RW = "rw"
    """Exclusive writer: builds a layout, then commits it (or aborts by leaving)."""
    RO = "ro"
    """Shared reader of the committed layout."""
    RW_OR_RO = "rw_or_ro"
    """RW when nothing is committed and nobody writes, else RO once a layout is committed."""


class LockState(StrEnum):
    EMPTY = "empty"
    RW = "rw"
    COMMITTED = "committed"
    RO = "ro"


class LockEvent(StrEnum):
    RW_CONNECT = "rw_connect"
    RW_COMMIT = "rw_commit"
    RW_ABORT = "rw_abort"
    RO_CONNECT = "ro_connect"
    RO_DISCONNECT = "ro_disconnect"


class MemoryTag(StrEnum):
    WEIGHTS = "weights"
    KV_CACHE = "kv_cache"


class MemoryBackendKind(StrEnum):
    SHARED_MEMORY = "shared_memory"
    CUDA_VMM = "cuda_vmm"


@dataclass(frozen=True, slots=True)
class Allocation:
    allocation_id: int
    size: int
    """Bytes, as requested."""
    aligned_size: int
    """Bytes, rounded up to the backend's alignment: what a client maps."""
    tag: MemoryTag
    layout_slot: int


@dataclass(frozen=True, slots=True)
class MetadataEntry:
    key: str
    allocation_id: int
    offset: int
    """Bytes from the start of the allocation."""
    value: bytes
    """Opaque to the gms (a tensor's dtype and shape, a model's configuration)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """A layout as a session sees it: allocations by slot, metadata by key."""

    layout_hash: int
    allocations: tuple[Allocation, ...]
    metadata: tuple[MetadataEntry, ...]

    def allocation(self, allocation_id: int) -> Allocation:
        for allocation in self.allocations:
            if allocation.allocation_id == allocation_id:
                return allocation
        raise KeyError(allocation_id)

    def entry(self, key: str) -> MetadataEntry:
        for entry in self.metadata:
            if entry.key == key:
                return entry
        raise KeyError(key)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    client_name: str
    mode: LockMode
    granted_unix_ms: int


@dataclass(frozen=True, slots=True)
class LockTransition:
    unix_ms: int
    event: LockEvent
    from_state: LockState
    to_state: LockState
    client_name: str
    detail: str
    layout_hash: int | None


@dataclass(frozen=True, slots=True)
class GmsInfo:
    """One tag's state, as introspection (outside the lock) reports it."""

    state: LockState
    tag: MemoryTag
    backend: MemoryBackendKind
    device: str
    layout_hash: int | None
    reader_count: int
    writer_present: bool
    allocation_count: int
    allocated_bytes: int
    alignment: int
    sessions: tuple[SessionInfo, ...]
    waiting_count: int
    metadata_count: int
    served_tags: tuple[MemoryTag, ...]
