"""GmsService: the first version answers GetInfo; the memory operations arrive with the gms issue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tokenyard.common.errors import Unimplemented
from tokenyard.gms.v1 import gms_pb2, gms_pb2_grpc

SERVICE_NAME = gms_pb2.DESCRIPTOR.services_by_name["GmsService"].full_name
_NOT_YET = "memory operations are not available in this gms version; GetInfo is"


class GmsServicer(gms_pb2_grpc.GmsServiceServicer):
    def __init__(self, device: str) -> None:
        self._device = device

    async def GetInfo(
        self, request: gms_pb2.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gms_pb2.GetInfoResponse:
        return gms_pb2.GetInfoResponse(
            state=gms_pb2.LOCK_STATE_EMPTY,
            device=self._device,
            allocation_count=0,
            allocated_bytes=0,
        )

    async def Lock(
        self, request: gms_pb2.LockRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[gms_pb2.LockResponse]:
        raise Unimplemented(_NOT_YET)
        yield gms_pb2.LockResponse()  # pragma: no cover - makes this an async generator

    async def Unlock(
        self, request: gms_pb2.UnlockRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gms_pb2.UnlockResponse:
        raise Unimplemented(_NOT_YET)

    async def Allocate(
        self, request: gms_pb2.AllocateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gms_pb2.AllocateResponse:
        raise Unimplemented(_NOT_YET)

    async def Commit(
        self, request: gms_pb2.CommitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gms_pb2.CommitResponse:
        raise Unimplemented(_NOT_YET)

    async def Import(
        self, request: gms_pb2.ImportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gms_pb2.ImportResponse:
        raise Unimplemented(_NOT_YET)
