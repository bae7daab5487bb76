"""The descriptor socket: a Unix stream socket next to the gRPC one that hands a session the
descriptors of its allocations (SCM_RIGHTS), which gRPC cannot carry.

Frames are a 4-byte big-endian length and one protobuf message (``FdRequest`` in,
``FdResponse`` out, with the descriptor attached when granted). Only a session that holds the
lock gets descriptors, and a reader's are read-only. A frame that is too long or does not parse
is answered with INVALID_ARGUMENT and the connection is closed; other connections never notice.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from tokenyard.api.gms.v1 import gms_pb2
from tokenyard.common.errors import TokenyardError
from tokenyard.common.gms import wire
from tokenyard.gms.manager import MemoryManager
from tokenyard.gms.metrics import GmsMetrics

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024
# A frame once started must arrive within this; idle connections between frames may stay.
FRAME_TIMEOUT_S = 30.0


class DescriptorServer:
    def __init__(self, path: Path, manager: MemoryManager, metrics: GmsMetrics | None = None) -> None:
        self.path = path
        self._manager = manager
        self._metrics = metrics
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self._listener = listener
        self._accept_task = asyncio.create_task(self._accept_forever(), name="gms-descriptor-accept")

    async def close(self) -> None:
        tasks = [t for t in (self._accept_task, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _accept_forever(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            if len(self._connections) >= MAX_CONNECTIONS:
                log.warning("descriptor socket: %d connections open, refusing another", MAX_CONNECTIONS)
                conn.close()
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                header = await _recv_exact(loop, conn, wire.FRAME_HEADER.size, first=True)
                if header is None:
                    return
                try:
                    length = wire.frame_length(header)
                    async with asyncio.timeout(FRAME_TIMEOUT_S):
                        payload = await _recv_exact(loop, conn, length, first=False)
                    assert payload is not None
                    request = gms_pb2.FdRequest.FromString(payload)
                except (wire.FrameError, DecodeError) as exc:
                    await self._refuse(loop, conn, grpc.StatusCode.INVALID_ARGUMENT, f"bad frame: {exc}")
                    return
                except TimeoutError:
                    await self._refuse(
                        loop,
                        conn,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"incomplete frame after {FRAME_TIMEOUT_S:g}s",
                    )
                    return
                await self._answer(loop, conn, request)
        except (ConnectionError, OSError) as exc:
            log.debug("descriptor connection closed: %s", exc)
        finally:
            conn.close()

    async def _answer(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, request: gms_pb2.FdRequest
    ) -> None:
        try:
            fd, allocation, read_only, session = self._manager.export(
                request.session_id, request.allocation_id
            )
        except TokenyardError as exc:
            await self._refuse(loop, conn, exc.code, str(exc))
            return
        try:
            reply = gms_pb2.FdResponse(
                code=grpc.StatusCode.OK.value[0],
                allocation_id=allocation.allocation_id,
                aligned_size_bytes=allocation.aligned_size,
                read_only=read_only,
            )
            await _send(loop, conn, wire.encode_frame(reply.SerializeToString()), fd)
        finally:
            os.close(fd)
        if self._metrics is not None:
            self._metrics.descriptors.labels(session.tag.value, session.mode.value).inc()

    async def _refuse(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, code: grpc.StatusCode, message: str
    ) -> None:
        if self._metrics is not None:
            self._metrics.descriptor_errors.labels(code.name.lower()).inc()
        reply = gms_pb2.FdResponse(code=code.value[0], message=message)
        await _send(loop, conn, wire.encode_frame(reply.SerializeToString()), None)


async def _recv_exact(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int, *, first: bool
) -> bytes | None:
    """``n`` bytes; None when the peer closed cleanly before the first byte of a frame.

    Plain reads: descriptors a client might send along are never received, so the kernel closes them."""
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(conn, n - len(data))
        if not chunk:
            if first and not data:
                return None
            raise ConnectionError("the client closed the connection inside a frame")
        data += chunk
    return data


async def _send(loop: asyncio.AbstractEventLoop, conn: socket.socket, data: bytes, fd: int | None) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    while True:
        try:
            sent = conn.sendmsg([data], ancillary)
            break
        except BlockingIOError:
            await _writable(loop, conn)
    if sent < len(data):
        # The descriptor went with the first byte; the rest is plain data.
        await loop.sock_sendall(conn, data[sent:])


async def _writable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(conn.fileno())
