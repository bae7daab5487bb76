"""Translation between the gms protobuf messages and :mod:`tokenyard.common.gms.types`, used by
both edges (the server's servicer and the client library), and the descriptor socket's framing."""

from __future__ import annotations

import struct

from tokenyard.api.gms.v1 import gms_pb2
from tokenyard.common.gms.types import (
    Allocation,
    GmsInfo,
    Layout,
    LockEvent,
    LockMode,
    LockState,
    LockTransition,
    MemoryBackendKind,
    MemoryTag,
    MetadataEntry,
    SessionInfo,
)

MODE_TO_PB = {
    LockMode.RW: gms_pb2.LOCK_MODE_RW,
    LockMode.RO: gms_pb2.LOCK_MODE_RO,
    LockMode.RW_OR_RO: gms_pb2.LOCK_MODE_RW_OR_RO,
}
MODE_FROM_PB: dict[int, LockMode] = {int(v): k for k, v in MODE_TO_PB.items()}
STATE_TO_PB = {
    LockState.EMPTY: gms_pb2.LOCK_STATE_EMPTY,
    LockState.RW: gms_pb2.LOCK_STATE_RW,
    LockState.COMMITTED: gms_pb2.LOCK_STATE_COMMITTED,
    LockState.RO: gms_pb2.LOCK_STATE_RO,
}
STATE_FROM_PB: dict[int, LockState] = {int(v): k for k, v in STATE_TO_PB.items()}
TAG_TO_PB = {MemoryTag.WEIGHTS: gms_pb2.MEMORY_TAG_WEIGHTS, MemoryTag.KV_CACHE: gms_pb2.MEMORY_TAG_KV_CACHE}
TAG_FROM_PB: dict[int, MemoryTag] = {int(v): k for k, v in TAG_TO_PB.items()}
EVENT_TO_PB = {
    LockEvent.RW_CONNECT: gms_pb2.LOCK_EVENT_RW_CONNECT,
    LockEvent.RW_COMMIT: gms_pb2.LOCK_EVENT_RW_COMMIT,
    LockEvent.RW_ABORT: gms_pb2.LOCK_EVENT_RW_ABORT,
    LockEvent.RO_CONNECT: gms_pb2.LOCK_EVENT_RO_CONNECT,
    LockEvent.RO_DISCONNECT: gms_pb2.LOCK_EVENT_RO_DISCONNECT,
}
EVENT_FROM_PB: dict[int, LockEvent] = {int(v): k for k, v in EVENT_TO_PB.items()}
BACKEND_TO_PB = {
    MemoryBackendKind.SHARED_MEMORY: gms_pb2.MEMORY_BACKEND_SHARED_MEMORY,
    MemoryBackendKind.CUDA_VMM: gms_pb2.MEMORY_BACKEND_CUDA_VMM,
}
BACKEND_FROM_PB: dict[int, MemoryBackendKind] = {int(v): k for k, v in BACKEND_TO_PB.items()}


def tag_from_pb(value: int) -> MemoryTag | None:
    """The tag of a request; unspecified means weights, an unknown number None."""
    if value == gms_pb2.MEMORY_TAG_UNSPECIFIED:
        return MemoryTag.WEIGHTS
    return TAG_FROM_PB.get(value)


def allocation_to_pb(a: Allocation) -> gms_pb2.Allocation:
    return gms_pb2.Allocation(
        allocation_id=a.allocation_id,
        size_bytes=a.size,
        aligned_size_bytes=a.aligned_size,
        tag=TAG_TO_PB[a.tag],
        layout_slot=a.layout_slot,
    )


def allocation_from_pb(m: gms_pb2.Allocation) -> Allocation:
    return Allocation(
        allocation_id=m.allocation_id,
        size=m.size_bytes,
        aligned_size=m.aligned_size_bytes,
        tag=TAG_FROM_PB[m.tag],
        layout_slot=m.layout_slot,
    )


def entry_to_pb(e: MetadataEntry) -> gms_pb2.MetadataEntry:
    return gms_pb2.MetadataEntry(
        key=e.key, allocation_id=e.allocation_id, offset_bytes=e.offset, value=e.value
    )


def entry_from_pb(m: gms_pb2.MetadataEntry) -> MetadataEntry:
    return MetadataEntry(key=m.key, allocation_id=m.allocation_id, offset=m.offset_bytes, value=m.value)


def layout_to_pb(layout: Layout) -> gms_pb2.ImportResponse:
    return gms_pb2.ImportResponse(
        layout_hash=layout.layout_hash,
        allocations=[allocation_to_pb(a) for a in layout.allocations],
        metadata=[entry_to_pb(e) for e in layout.metadata],
    )


def layout_from_pb(m: gms_pb2.ImportResponse) -> Layout:
    return Layout(
        layout_hash=m.layout_hash,
        allocations=tuple(allocation_from_pb(a) for a in m.allocations),
        metadata=tuple(entry_from_pb(e) for e in m.metadata),
    )


def info_to_pb(info: GmsInfo) -> gms_pb2.GetInfoResponse:
    reply = gms_pb2.GetInfoResponse(
        state=STATE_TO_PB[info.state],
        tag=TAG_TO_PB[info.tag],
        backend=BACKEND_TO_PB[info.backend],
        device=info.device,
        reader_count=info.reader_count,
        writer_present=info.writer_present,
        allocation_count=info.allocation_count,
        allocated_bytes=info.allocated_bytes,
        alignment_bytes=info.alignment,
        sessions=[
            gms_pb2.SessionInfo(
                client_name=s.client_name, mode=MODE_TO_PB[s.mode], granted_unix_ms=s.granted_unix_ms
            )
            for s in info.sessions
        ],
        waiting_count=info.waiting_count,
        metadata_count=info.metadata_count,
        served_tags=[TAG_TO_PB[t] for t in info.served_tags],
    )
    if info.layout_hash is not None:
        reply.layout_hash = info.layout_hash
    return reply


def info_from_pb(m: gms_pb2.GetInfoResponse) -> GmsInfo:
    return GmsInfo(
        state=STATE_FROM_PB[m.state],
        tag=TAG_FROM_PB[m.tag],
        backend=BACKEND_FROM_PB[m.backend],
        device=m.device,
        layout_hash=m.layout_hash if m.HasField("layout_hash") else None,
        reader_count=m.reader_count,
        writer_present=m.writer_present,
        allocation_count=m.allocation_count,
        allocated_bytes=m.allocated_bytes,
        alignment=m.alignment_bytes,
        sessions=tuple(
            SessionInfo(s.client_name, MODE_FROM_PB[s.mode], s.granted_unix_ms) for s in m.sessions
        ),
        waiting_count=m.waiting_count,
        metadata_count=m.metadata_count,
        served_tags=tuple(TAG_FROM_PB[t] for t in m.served_tags),
    )


def transition_to_pb(t: LockTransition) -> gms_pb2.LockTransition:
    m = gms_pb2.LockTransition(
        unix_ms=t.unix_ms,
        event=EVENT_TO_PB[t.event],
        from_state=STATE_TO_PB[t.from_state],
        to_state=STATE_TO_PB[t.to_state],
        client_name=t.client_name,
        detail=t.detail,
    )
    if t.layout_hash is not None:
        m.layout_hash = t.layout_hash
    return m


def transition_from_pb(m: gms_pb2.LockTransition) -> LockTransition:
    return LockTransition(
        unix_ms=m.unix_ms,
        event=EVENT_FROM_PB[m.event],
        from_state=STATE_FROM_PB[m.from_state],
        to_state=STATE_FROM_PB[m.to_state],
        client_name=m.client_name,
        detail=m.detail,
        layout_hash=m.layout_hash if m.HasField("layout_hash") else None,
    )


# ---- the descriptor socket's frames: a 4-byte big-endian length, then one message ----------

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024


class FrameError(ValueError):
    """A frame that is too long or does not parse."""


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return FRAME_HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return int(length)
