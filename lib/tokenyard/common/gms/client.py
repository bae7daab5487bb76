"""A blocking client of one gms lock session (engines load weights on a worker thread).

::

    with GmsClient.connect(socket, LockMode.RW_OR_RO, timeout_s=60, client_name="worker-1") as gms:
        if gms.mode is LockMode.RW:
            allocation = gms.allocate(nbytes)
            with gms.map(allocation) as memory:   # writable for the writer
                memory[:nbytes] = data
            gms.put_metadata([MetadataEntry("weights", allocation.allocation_id, 0, b"...")])
            gms.commit()                          # publishes and ends the session
        else:
            layout = gms.import_layout()
            memory = gms.map(layout.allocations[0])   # read-only; stays valid after close()

The lock is the session's Lock call: closing the client (or the process dying) releases it, and a
writer that leaves without committing aborts its layout. Mappings outlive the session: the memory
is freed when the last mapping goes, whatever the gms does meanwhile.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import sys
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import grpc

from tokenyard.api.gms.v1 import gms_pb2, gms_pb2_grpc
from tokenyard.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TokenyardError,
    Unavailable,
    from_rpc_error,
)
from tokenyard.common.gms import wire
from tokenyard.common.gms.paths import fd_socket_path
from tokenyard.common.gms.types import (
    Allocation,
    GmsInfo,
    Layout,
    LockMode,
    LockTransition,
    MemoryTag,
    MetadataEntry,
)

# Unary calls answer at once (Allocate may wait for memory: it gets no deadline).
CALL_TIMEOUT_S = 30.0
PUT_BATCH = 4096
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


def _channel(socket_path: str | os.PathLike[str]) -> grpc.Channel:
    return grpc.insecure_channel(f"unix://{os.fspath(socket_path)}", options=CHANNEL_OPTIONS)


def _error(err: grpc.RpcError, socket_path: str | os.PathLike[str]) -> TokenyardError:
    domain = from_rpc_error(err)
    if isinstance(domain, Unavailable):
        return Unavailable(f"gms at {os.fspath(socket_path)}: {domain}")
    return domain


def get_info(socket_path: str | os.PathLike[str], tag: MemoryTag = MemoryTag.WEIGHTS) -> GmsInfo:
    """One tag's state, without taking the lock."""
    with _channel(socket_path) as channel:
        try:
            reply = gms_pb2_grpc.GmsServiceStub(channel).GetInfo(
                gms_pb2.GetInfoRequest(tag=wire.TAG_TO_PB[tag]), timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as err:
            raise _error(err, socket_path) from None
    return wire.info_from_pb(reply)


def event_history(
    socket_path: str | os.PathLike[str], tag: MemoryTag = MemoryTag.WEIGHTS, limit: int = 0
) -> list[LockTransition]:
    """One tag's lock transitions, oldest first, without taking the lock."""
    with _channel(socket_path) as channel:
        try:
            reply = gms_pb2_grpc.GmsServiceStub(channel).GetEventHistory(
                gms_pb2.GetEventHistoryRequest(tag=wire.TAG_TO_PB[tag], limit=limit), timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as err:
            raise _error(err, socket_path) from None
    return [wire.transition_from_pb(e) for e in reply.events]


class GmsClient:
    """One lock session on one tag of a gms. Use :meth:`connect`; not shared between threads."""

    def __init__(
        self,
        socket_path: str,
        channel: grpc.Channel,
        call: Any,
        granted: gms_pb2.LockResponse,
    ) -> None:
        self.socket_path = socket_path
        self._channel = channel
        self._stub = gms_pb2_grpc.GmsServiceStub(channel)
        self._call = call
        self.session_id = granted.session_id
        self.mode = wire.MODE_FROM_PB[granted.granted_mode]
        self.tag = wire.TAG_FROM_PB[granted.tag]
        self.layout_hash: int | None = granted.layout_hash if granted.HasField("layout_hash") else None
        """The committed layout a reader holds (None for a writer until it commits)."""
        self._fd_socket: socket.socket | None = None
        self._fd_lock = threading.Lock()
        self._open = True

    @classmethod
    def connect(
        cls,
        socket_path: str | os.PathLike[str],
        mode: LockMode = LockMode.RW_OR_RO,
        *,
        tag: MemoryTag = MemoryTag.WEIGHTS,
        timeout_s: float | None = None,
        client_name: str = "",
    ) -> GmsClient:
        """Take the lock (waiting up to ``timeout_s``, forever when None).

        Unavailable when the gms is not reachable, DeadlineExceeded when the lock is not granted
        in time, FailedPrecondition for a tag the gms does not serve."""
        path = os.fspath(socket_path)
        mode, tag = LockMode(mode), MemoryTag(tag)
        if timeout_s is not None and timeout_s <= 0:
            raise InvalidArgument("timeout_s must be positive (None waits without limit)")
        wait_ms = 0 if timeout_s is None else max(1, min(int(timeout_s * 1000), 2**32 - 1))
        name = client_name or f"pid {os.getpid()}"
        channel = _channel(path)
        call = gms_pb2_grpc.GmsServiceStub(channel).Lock(
            gms_pb2.LockRequest(
                mode=wire.MODE_TO_PB[mode],
                wait_timeout_ms=wait_ms,
                client_name=name,
                tag=wire.TAG_TO_PB[tag],
            )
        )
        try:
            granted = next(iter(call))
        except grpc.RpcError as err:
            channel.close()
            raise _error(err, path) from None
        except StopIteration:
            channel.close()
            raise Unavailable(f"gms at {path} ended the Lock call without granting it") from None
        return cls(path, channel, call, granted)

    # ---- writer --------------------------------------------------------------------------

    def allocate(self, size: int, layout_slot: int | None = None) -> Allocation:
        """A new allocation of ``size`` bytes in the layout being built (writer only)."""
        request = gms_pb2.AllocateRequest(session_id=self.session_id, size_bytes=size)
        if layout_slot is not None:
            request.layout_slot = layout_slot
        reply = self._unary(self._stub.Allocate, request, timeout=None)
        return wire.allocation_from_pb(reply.allocation)

    def put_metadata(self, entries: Iterable[MetadataEntry]) -> int:
        """Add or replace entries (writer only); returns how many the layout holds."""
        batch: list[gms_pb2.MetadataEntry] = []
        count = 0
        for entry in entries:
            batch.append(wire.entry_to_pb(entry))
            if len(batch) == PUT_BATCH:
                count = self._put(batch)
                batch = []
        if batch:
            count = self._put(batch)
        return count

    def _put(self, batch: list[gms_pb2.MetadataEntry]) -> int:
        reply = self._unary(
            self._stub.PutMetadata, gms_pb2.PutMetadataRequest(session_id=self.session_id, entries=batch)
        )
        return int(reply.metadata_count)

    def delete_metadata(self, keys: Iterable[str]) -> int:
        reply = self._unary(
            self._stub.DeleteMetadata,
            gms_pb2.DeleteMetadataRequest(session_id=self.session_id, keys=list(keys)),
        )
        return int(reply.deleted_count)

    def commit(self) -> int:
        """Publish the layout and end this session; returns the layout hash."""
        reply = self._unary(self._stub.Commit, gms_pb2.CommitRequest(session_id=self.session_id))
        self.layout_hash = int(reply.layout_hash)
        self._finish()
        return self.layout_hash

    # ---- any session ---------------------------------------------------------------------

    def get_metadata(self, key: str) -> MetadataEntry:
        """NotFound when the layout has no such key."""
        reply = self._unary(
            self._stub.GetMetadata, gms_pb2.GetMetadataRequest(session_id=self.session_id, key=key)
        )
        return wire.entry_from_pb(reply.entry)

    def list_metadata(self, prefix: str = "") -> list[str]:
        reply = self._unary(
            self._stub.ListMetadata, gms_pb2.ListMetadataRequest(session_id=self.session_id, prefix=prefix)
        )
        return list(reply.keys)

    def import_layout(self, expected_hash: int | None = None) -> Layout:
        """The session's layout; FailedPrecondition when ``expected_hash`` is given and differs."""
        request = gms_pb2.ImportRequest(session_id=self.session_id)
        if expected_hash is not None:
            request.expected_layout_hash = expected_hash
        return wire.layout_from_pb(self._unary(self._stub.Import, request))

    def fd(self, allocation: Allocation | int) -> tuple[int, bool]:
        """A new descriptor of the allocation's memory (the caller closes it) and whether it
        is read-only (reader sessions)."""
        allocation_id = allocation if isinstance(allocation, int) else allocation.allocation_id
        self._check_open()
        request = wire.encode_frame(
            gms_pb2.FdRequest(session_id=self.session_id, allocation_id=allocation_id).SerializeToString()
        )
        with self._fd_lock:
            sock = self._fd_connection()
            try:
                sock.sendall(request)
                payload, fds = _read_frame(sock)
            except (OSError, wire.FrameError) as exc:
                self._drop_fd_connection()
                raise Unavailable(
                    f"gms descriptor socket {fd_socket_path(self.socket_path)}: {exc}"
                ) from None
        reply = gms_pb2.FdResponse.FromString(payload)
        if reply.code != grpc.StatusCode.OK.value[0]:
            for extra in fds:
                os.close(extra)
            raise _status_error(reply.code, reply.message)
        if len(fds) != 1:
            for extra in fds:
                os.close(extra)
            raise Unavailable(f"gms sent {len(fds)} descriptors for allocation {allocation_id}, expected 1")
        return fds[0], reply.read_only

    def map(self, allocation: Allocation, *, writable: bool | None = None) -> mmap.mmap:
        """Map the whole allocation (its aligned size), shared: writable for the writer by
        default, read-only for readers (who cannot ask for more)."""
        fd, read_only = self.fd(allocation)
        try:
            want_write = (self.mode is LockMode.RW) if writable is None else writable
            if want_write and read_only:
                raise FailedPrecondition("a reader's mapping is read-only: only the RW session may write")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if want_write else 0)
            return mmap.mmap(fd, allocation.aligned_size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    def close(self) -> None:
        """Release the lock (a writer that has not committed aborts) and the connections."""
        if not self._open:
            return
        with contextlib.suppress(grpc.RpcError):
            self._stub.Unlock(gms_pb2.UnlockRequest(session_id=self.session_id), timeout=5)
        self._finish()

    def _finish(self) -> None:
        self._open = False
        self._call.cancel()
        self._drop_fd_connection()
        self._channel.close()

    def __enter__(self) -> GmsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten client must not hold the lock for the rest of the process's life. Only the
        # call is cancelled: closing a channel while the interpreter shuts down can hang, and
        # process exit closes the connection (and so releases the lock) anyway.
        if self._open and not sys.is_finalizing():
            with contextlib.suppress(Exception):
                self._call.cancel()
                self._drop_fd_connection()

    # ---- plumbing ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise FailedPrecondition("this gms session has ended (closed or committed)")

    def _unary(self, method: Any, request: Any, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        self._check_open()
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _error(err, self.socket_path) from None

    def _fd_connection(self) -> socket.socket:
        if self._fd_socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CALL_TIMEOUT_S)
            try:
                sock.connect(fd_socket_path(self.socket_path))
            except OSError as exc:
                sock.close()
                raise Unavailable(
                    f"gms descriptor socket {fd_socket_path(self.socket_path)} is not reachable: {exc}"
                ) from None
            self._fd_socket = sock
        return self._fd_socket

    def _drop_fd_connection(self) -> None:
        if self._fd_socket is not None:
            self._fd_socket.close()
            self._fd_socket = None


def _read_frame(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One frame and the descriptors that came with it (the kernel attaches them to the first
    bytes of the message, so they arrive with the first read)."""
    data = b""
    fds: list[int] = []
    need = wire.FRAME_HEADER.size
    while True:
        while len(data) < need:
            chunk, new_fds, _flags, _addr = socket.recv_fds(sock, need - len(data), 4)
            fds.extend(new_fds)
            if not chunk:
                for fd in fds:
                    os.close(fd)
                raise ConnectionError("the gms closed the descriptor socket")
            data += chunk
        if need == wire.FRAME_HEADER.size:
            need += wire.frame_length(data[: wire.FRAME_HEADER.size])
            continue
        return data[wire.FRAME_HEADER.size : need], fds


def _status_error(code: int, message: str) -> TokenyardError:
    by_value = {c.value[0]: c for c in grpc.StatusCode}
    status = by_value.get(code, grpc.StatusCode.UNKNOWN)
    classes: dict[grpc.StatusCode, type[TokenyardError]] = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    }
    return classes.get(status, TokenyardError)(message or status.name)
