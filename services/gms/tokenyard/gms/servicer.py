"""GmsService: protobuf in, :class:`~tokenyard.gms.manager.MemoryManager` calls, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tokenyard.api.gms.v1 import gms_pb2, gms_pb2_grpc
from tokenyard.common.errors import InvalidArgument
from tokenyard.common.gms import wire
from tokenyard.common.gms.types import LockMode, MemoryTag
from tokenyard.gms.manager import MemoryManager

SERVICE_NAME = gms_pb2.DESCRIPTOR.services_by_name["GmsService"].full_name
MAX_CLIENT_NAME = 256

Context = grpc.aio.ServicerContext[Any, Any]


def _tag(value: int) -> MemoryTag:
    tag = wire.tag_from_pb(value)
    if tag is None:
        raise InvalidArgument(f"unknown memory tag {value}")
    return tag


def _mode(value: int) -> LockMode:
    mode = wire.MODE_FROM_PB.get(value)
    if mode is None:
        raise InvalidArgument("mode must be LOCK_MODE_RW, LOCK_MODE_RO or LOCK_MODE_RW_OR_RO")
    return mode


def _client_name(value: str) -> str:
    # Names go into logs and introspection: printable and short.
    return "".join(c for c in value[:MAX_CLIENT_NAME] if c.isprintable())


class GmsServicer(gms_pb2_grpc.GmsServiceServicer):
    def __init__(self, manager: MemoryManager) -> None:
        self._manager = manager

    async def GetInfo(self, request: gms_pb2.GetInfoRequest, context: Context) -> gms_pb2.GetInfoResponse:
        return wire.info_to_pb(self._manager.info(_tag(request.tag)))

    async def GetEventHistory(
        self, request: gms_pb2.GetEventHistoryRequest, context: Context
    ) -> gms_pb2.GetEventHistoryResponse:
        events = self._manager.history(_tag(request.tag), request.limit)
        return gms_pb2.GetEventHistoryResponse(events=[wire.transition_to_pb(e) for e in events])

    async def Lock(
        self, request: gms_pb2.LockRequest, context: Context
    ) -> AsyncIterator[gms_pb2.LockResponse]:
        tag = _tag(request.tag)
        mode = _mode(request.mode)
        timeout = request.wait_timeout_ms / 1000 if request.wait_timeout_ms else None
        session = await self._manager.lock(tag, mode, _client_name(request.client_name), timeout)
        try:
            domain = self._manager.domains[tag]
            reply = gms_pb2.LockResponse(
                session_id=session.session_id,
                granted_mode=wire.MODE_TO_PB[session.mode],
                state=wire.STATE_TO_PB[domain.state],
                tag=wire.TAG_TO_PB[tag],
            )
            if session.mode is LockMode.RO and domain.committed is not None:
                assert domain.committed.layout_hash is not None
                reply.layout_hash = domain.committed.layout_hash
            yield reply
            # The lock lives as long as this call: Unlock and Commit end it from here, a
            # client that goes away cancels it.
            await session.ended.wait()
        finally:
            self._manager.end(session, "disconnected")

    async def Unlock(self, request: gms_pb2.UnlockRequest, context: Context) -> gms_pb2.UnlockResponse:
        state, aborted = self._manager.unlock(request.session_id)
        return gms_pb2.UnlockResponse(state=wire.STATE_TO_PB[state], aborted=aborted)

    async def Allocate(self, request: gms_pb2.AllocateRequest, context: Context) -> gms_pb2.AllocateResponse:
        slot = request.layout_slot if request.HasField("layout_slot") else None
        allocation = await self._manager.allocate(request.session_id, request.size_bytes, slot)
        return gms_pb2.AllocateResponse(allocation=wire.allocation_to_pb(allocation))

    async def PutMetadata(
        self, request: gms_pb2.PutMetadataRequest, context: Context
    ) -> gms_pb2.PutMetadataResponse:
        count = self._manager.put_metadata(
            request.session_id, [wire.entry_from_pb(e) for e in request.entries]
        )
        return gms_pb2.PutMetadataResponse(metadata_count=count)

    async def DeleteMetadata(
        self, request: gms_pb2.DeleteMetadataRequest, context: Context
    ) -> gms_pb2.DeleteMetadataResponse:
        deleted = self._manager.delete_metadata(request.session_id, list(request.keys))
        return gms_pb2.DeleteMetadataResponse(deleted_count=deleted)

    async def GetMetadata(
        self, request: gms_pb2.GetMetadataRequest, context: Context
    ) -> gms_pb2.GetMetadataResponse:
        entry = self._manager.get_metadata(request.session_id, request.key)
        return gms_pb2.GetMetadataResponse(entry=wire.entry_to_pb(entry))

    async def ListMetadata(
        self, request: gms_pb2.ListMetadataRequest, context: Context
    ) -> gms_pb2.ListMetadataResponse:
        return gms_pb2.ListMetadataResponse(
            keys=self._manager.list_metadata(request.session_id, request.prefix)
        )

    async def Commit(self, request: gms_pb2.CommitRequest, context: Context) -> gms_pb2.CommitResponse:
        layout_hash, count = self._manager.commit(request.session_id)
        return gms_pb2.CommitResponse(
            layout_hash=layout_hash, allocation_count=count, state=gms_pb2.LOCK_STATE_COMMITTED
        )

    async def Import(self, request: gms_pb2.ImportRequest, context: Context) -> gms_pb2.ImportResponse:
        expected = request.expected_layout_hash if request.HasField("expected_layout_hash") else None
        return wire.layout_to_pb(self._manager.import_layout(request.session_id, expected))
