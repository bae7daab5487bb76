"""The gms's domain: the lock domains of every tag served, the sessions that hold them, and the
operations a session may perform (writer: allocate, metadata, commit; any: read, import, take
descriptors). Servicer and descriptor socket call into this; it knows nothing of protobuf.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time

import grpc

from tokenyard.common.errors import FailedPrecondition, InvalidArgument, NotFound, TokenyardError
from tokenyard.common.gms.types import (
    Allocation,
    GmsInfo,
    Layout,
    LockMode,
    LockState,
    LockTransition,
    MemoryTag,
    MetadataEntry,
)
from tokenyard.gms.backend import BackendError, Handle, MemoryBackend, OutOfMemory
from tokenyard.gms.layout import LayoutBuilder
from tokenyard.gms.lock import LockDomain, Session
from tokenyard.gms.metrics import GmsMetrics

log = logging.getLogger(__name__)

# An allocation larger than this is a bug in the caller, not a request to retry for a minute.
MAX_ALLOCATION_BYTES = 1 << 48
MAX_PUT_ENTRIES = 4096


class OutOfMemoryError(TokenyardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class MemoryManager:
    def __init__(
        self,
        backend: MemoryBackend,
        tags: tuple[MemoryTag, ...],
        device: str,
        *,
        retry_interval: float = 0.5,
        retry_timeout: float = 60.0,
        max_bytes: int = 0,
        metrics: GmsMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.tags = tags
        self.device = device
        self.retry_interval = retry_interval
        self.retry_timeout = retry_timeout
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._ids = itertools.count(1)
        on_change = metrics.observe if metrics is not None else None
        self.domains = {
            tag: LockDomain(tag, backend, self._new_session_id, on_change=on_change) for tag in tags
        }
        self.sessions: dict[str, Session] = {}
        for domain in self.domains.values():
            if on_change is not None:
                on_change(domain, None)

    @staticmethod
    def _new_session_id() -> str:
        return secrets.token_hex(16)

    # ---- sessions --------------------------------------------------------------------------

    def domain(self, tag: MemoryTag) -> LockDomain:
        found = self.domains.get(tag)
        if found is None:
            served = ",".join(t.value for t in self.tags)
            raise FailedPrecondition(
                f"this gms serves {served}, not {tag.value} (start it with --tags {served},{tag.value})"
            )
        return found

    async def lock(
        self, tag: MemoryTag, mode: LockMode, client_name: str, timeout_s: float | None
    ) -> Session:
        session = await self.domain(tag).acquire(mode, client_name, timeout_s)
        self.sessions[session.session_id] = session
        log.info("%s lock on %s granted to %r", session.mode.value, tag.value, client_name)
        return session

    def session(self, session_id: str) -> Session:
        found = self.sessions.get(session_id)
        if found is None or found.ended.is_set():
            raise NotFound("no such session (it ended, or was never granted): take the lock first")
        return found

    def end(self, session: Session, detail: str) -> tuple[LockState, bool]:
        """End a session for any reason (idempotent)."""
        self.sessions.pop(session.session_id, None)
        domain = self.domains[session.tag]
        building = domain.building if session is domain.writer else None
        empty = building is not None and not building.allocations and not building.metadata
        state, aborted = domain.release(session, detail)
        if aborted and empty:
            # A writer that built nothing (e.g. a CPU worker handing the build to its publisher
            # process) lost nothing: not worth a warning.
            log.info(
                "%r released the %s lock without building (%s)",
                session.client_name,
                session.tag.value,
                detail,
            )
        elif aborted:
            log.warning(
                "%r left its %s build without committing (%s): discarded",
                session.client_name,
                session.tag.value,
                detail,
            )
        return state, aborted

    def unlock(self, session_id: str) -> tuple[LockState, bool]:
        return self.end(self.session(session_id), "unlocked")

    def _writer(self, session_id: str, what: str) -> tuple[Session, LockDomain, LayoutBuilder]:
        session = self.session(session_id)
        if session.mode is not LockMode.RW:
            raise FailedPrecondition(f"{what} needs the RW lock; this session holds {session.mode.value}")
        domain = self.domains[session.tag]
        return session, domain, domain.layout_of(session)

    def _layout(self, session_id: str) -> tuple[Session, LayoutBuilder]:
        session = self.session(session_id)
        return session, self.domains[session.tag].layout_of(session)

    # ---- writer ----------------------------------------------------------------------------

    async def allocate(self, session_id: str, size: int, slot: int | None) -> Allocation:
        session, domain, layout = self._writer(session_id, "Allocate")
        if size <= 0:
            raise InvalidArgument("size_bytes must be positive")
        if size > MAX_ALLOCATION_BYTES:
            raise InvalidArgument(f"size_bytes {size} exceeds {MAX_ALLOCATION_BYTES}")
        align = self.backend.alignment
        aligned = -(-size // align) * align
        if self.max_bytes and aligned > self.max_bytes:
            raise InvalidArgument(f"{aligned} bytes can never fit under --max-bytes {self.max_bytes}")
        if slot is not None:
            layout.check_slot(slot)
        tag = session.tag.value
        deadline = time.monotonic() + self.retry_timeout
        while True:
            try:
                handle = await self._create(aligned)
                break
            except OutOfMemory as exc:
                if time.monotonic() + self.retry_interval > deadline:
                    if self.metrics is not None:
                        self.metrics.allocation_failures.labels(tag).inc()
                    raise OutOfMemoryError(
                        f"no memory for {size} bytes within {self.retry_timeout:g}s "
                        f"(--alloc-retry-timeout): {exc}"
                    ) from None
                if self.metrics is not None:
                    self.metrics.allocation_retries.labels(tag).inc()
                await asyncio.sleep(self.retry_interval)
                if session.ended.is_set():
                    raise FailedPrecondition("the session ended while waiting for memory") from None
            except BackendError as exc:
                raise TokenyardError(f"allocation of {size} bytes failed: {exc}") from None
        if session.ended.is_set() or domain.writer is not session:
            self.backend.release(handle)
            raise FailedPrecondition("the session ended while its memory was being allocated")
        allocation = Allocation(
            allocation_id=next(self._ids),
            size=size,
            aligned_size=aligned,
            tag=session.tag,
            layout_slot=layout.next_slot() if slot is None else slot,
        )
        try:
            layout.add(allocation, handle)
        except TokenyardError:
            self.backend.release(handle)
            raise
        domain.notify(None)
        return allocation

    async def _create(self, size: int) -> Handle:
        """Create off the event loop (reserving pages takes time); never leak the handle of a
        caller that went away meanwhile."""
        task = asyncio.ensure_future(asyncio.to_thread(self.backend.create, size))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:

            def give_back(done: asyncio.Future[Handle]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self.backend.release(done.result())

            task.add_done_callback(give_back)
            raise

    def put_metadata(self, session_id: str, entries: list[MetadataEntry]) -> int:
        if len(entries) > MAX_PUT_ENTRIES:
            raise InvalidArgument(f"at most {MAX_PUT_ENTRIES} entries per PutMetadata")
        _, _, layout = self._writer(session_id, "PutMetadata")
        layout.put(entries)
        return len(layout.metadata)

    def delete_metadata(self, session_id: str, keys: list[str]) -> int:
        _, _, layout = self._writer(session_id, "DeleteMetadata")
        return layout.delete(keys)

    def commit(self, session_id: str) -> tuple[int, int]:
        session, domain, _ = self._writer(session_id, "Commit")
        layout = domain.commit(session)
        self.sessions.pop(session_id, None)
        assert layout.layout_hash is not None
        log.info(
            "%r committed %s layout %#018x: %d allocation(s), %d bytes",
            session.client_name,
            session.tag.value,
            layout.layout_hash,
            len(layout.allocations),
            layout.allocated_bytes,
        )
        return layout.layout_hash, len(layout.allocations)

    # ---- any session -----------------------------------------------------------------------

    def get_metadata(self, session_id: str, key: str) -> MetadataEntry:
        _, layout = self._layout(session_id)
        entry = layout.metadata.get(key)
        if entry is None:
            raise NotFound(f"no metadata {key!r} in this layout")
        return entry

    def list_metadata(self, session_id: str, prefix: str) -> list[str]:
        _, layout = self._layout(session_id)
        return sorted(k for k in layout.metadata if k.startswith(prefix))

    def import_layout(self, session_id: str, expected_hash: int | None) -> Layout:
        session, layout = self._layout(session_id)
        view = layout.view()
        if expected_hash is not None and session.mode is LockMode.RO and view.layout_hash != expected_hash:
            raise FailedPrecondition(
                f"stale layout: expected {expected_hash:#018x}, the gms holds {view.layout_hash:#018x}"
            )
        return view

    def export(self, session_id: str, allocation_id: int) -> tuple[int, Allocation, bool, Session]:
        """A new descriptor of an allocation of the session's layout (the caller closes it)."""
        session, layout = self._layout(session_id)
        allocation, handle = layout.handle(allocation_id)
        read_only = session.mode is LockMode.RO
        return self.backend.export(handle, read_only=read_only), allocation, read_only, session

    # ---- introspection ---------------------------------------------------------------------

    def info(self, tag: MemoryTag) -> GmsInfo:
        return self.domain(tag).info(self.device, self.tags)

    def history(self, tag: MemoryTag, limit: int) -> list[LockTransition]:
        events = list(self.domain(tag).history)
        return events[-limit:] if limit else events

    def shutdown(self) -> None:
        """End every session and refuse every waiter: the server is about to stop."""
        for domain in self.domains.values():
            domain.shutdown("shutting down")
        self.sessions.clear()

    def close(self) -> None:
        for domain in self.domains.values():
            domain.close()
        self.sessions.clear()
