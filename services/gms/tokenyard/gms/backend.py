"""Where allocations come from: the memory backend behind the gms.

The gms creates memory, hands out descriptors of it, and frees it; it never maps it (a server
that touches no memory survives whatever its clients do to theirs). :class:`SharedMemoryBackend`
serves CPU engines with memfds; a CUDA VMM backend fills the same :class:`MemoryBackend` with
``cuMemCreate`` and ``cuMemExportToShareableHandle`` (POSIX descriptors, passed the same way).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Protocol

from tokenyard.common.gms.types import MemoryBackendKind


class OutOfMemory(Exception):
    """No memory for this allocation now; it may be there later (retried until a timeout)."""


class BackendError(Exception):
    """The backend cannot serve this request at all."""


@dataclass(eq=False)
class Handle:
    """One allocation's memory, owned by the server until :meth:`MemoryBackend.release`."""

    fd: int
    size: int


class MemoryBackend(Protocol):
    kind: MemoryBackendKind
    alignment: int
    """Allocation sizes are rounded up to a multiple of this many bytes."""

    def create(self, size: int) -> Handle:
        """Memory of ``size`` bytes (already aligned). OutOfMemory when there is none now."""
        ...

    def export(self, handle: Handle, *, read_only: bool) -> int:
        """A new descriptor of the memory for a client (the caller closes it once sent)."""
        ...

    def release(self, handle: Handle) -> None:
        """Give the memory up; clients that mapped it keep it until they unmap."""
        ...


# Nobody may resize an allocation behind its readers' backs (they would fault past the end).
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedMemoryBackend:
    """memfd allocations: anonymous shared memory, named only by descriptors.

    Readers get a descriptor re-opened read-only (``/proc/self/fd``), which the kernel refuses
    to map writable; the writer gets a read-write one. Every memfd is sealed against resizing.
    """

    kind = MemoryBackendKind.SHARED_MEMORY

    def __init__(self, *, reserve: bool = True, max_bytes: int = 0, name: str = "tokenyard-gms") -> None:
        self.alignment = mmap.PAGESIZE
        self._reserve = reserve
        self._max_bytes = max_bytes
        self._name = name
        self.allocated = 0
        # create() runs on worker threads (reserving pages takes time); release() on the loop.
        self._accounting = threading.Lock()

    def create(self, size: int) -> Handle:
        with self._accounting:
            if self._max_bytes and self.allocated + size > self._max_bytes:
                raise OutOfMemory(
                    f"{size} bytes more would exceed --max-bytes {self._max_bytes} ({self.allocated} in use)"
                )
            self.allocated += size
        try:
            return Handle(self._memfd(size), size)
        except BaseException:
            with self._accounting:
                self.allocated -= size
            raise

    def _memfd(self, size: int) -> int:
        fd = os.memfd_create(self._name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            if self._reserve:
                # Commits the pages now (tmpfs fallocate), without mapping them.
                os.posix_fallocate(fd, 0, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG):
                raise OutOfMemory(f"{size} bytes: {exc.strerror}") from None
            raise BackendError(f"{size} bytes: {exc.strerror or exc}") from None
        return fd

    def export(self, handle: Handle, *, read_only: bool) -> int:
        if read_only:
            return os.open(f"/proc/self/fd/{handle.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return os.dup(handle.fd)

    def release(self, handle: Handle) -> None:
        if handle.fd >= 0:
            os.close(handle.fd)
            handle.fd = -1
            with self._accounting:
                self.allocated -= handle.size


def backend_for(device: str, *, reserve: bool, max_bytes: int) -> MemoryBackend:
    if device == "cpu":
        return SharedMemoryBackend(reserve=reserve, max_bytes=max_bytes)
    raise BackendError(f"device {device!r} needs the CUDA VMM backend, which this build does not have")
