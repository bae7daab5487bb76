"""The lock state machine of one tag: who may write, who reads, and the layouts they see.

=========  ===========================  ===========================
state      RW connect                   RO connect
=========  ===========================  ===========================
EMPTY      granted -> RW                waits
RW         waits                        waits
COMMITTED  granted -> RW (clears it)    granted -> RO
RO         waits                        granted -> RO
=========  ===========================  ===========================

RW_OR_RO resolves to RW in EMPTY and to RO in COMMITTED or RO; while a writer builds it waits, and
is decided again when the writer commits (RO) or aborts (RW). A request that arrives while others
wait is still granted if the state allows it (the table above, exactly); waiters are woken in
arrival order after every transition.

Sessions end by unlock, by commit (the writer), or when their connection goes; a writer that ends
without committing aborts: its allocations are freed and the state goes back to EMPTY, so nothing
half-built is ever visible. Everything here runs on the event loop; nothing blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenyard.common.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from tokenyard.common.gms.types import (
    GmsInfo,
    LockEvent,
    LockMode,
    LockState,
    LockTransition,
    MemoryTag,
    SessionInfo,
)
from tokenyard.gms.backend import MemoryBackend
from tokenyard.gms.layout import LayoutBuilder

HISTORY_SIZE = 256


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(eq=False)
class Session:
    session_id: str
    tag: MemoryTag
    mode: LockMode
    """RW or RO (never RW_OR_RO: resolved when granted)."""
    client_name: str
    granted_unix_ms: int
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Waiter:
    mode: LockMode
    client_name: str
    future: asyncio.Future[Session]


class LockDomain:
    """One tag's state, sessions, layouts and transition history."""

    def __init__(
        self,
        tag: MemoryTag,
        backend: MemoryBackend,
        new_session_id: Callable[[], str],
        *,
        on_change: Callable[[LockDomain, LockEvent | None], None] | None = None,
        history_size: int = HISTORY_SIZE,
    ) -> None:
        self.tag = tag
        self.backend = backend
        self._new_id = new_session_id
        self._on_change = on_change
        self.state = LockState.EMPTY
        self.writer: Session | None = None
        self.readers: dict[str, Session] = {}
        self.building: LayoutBuilder | None = None
        self.committed: LayoutBuilder | None = None
        self._waiters: deque[_Waiter] = deque()
        self.history: deque[LockTransition] = deque(maxlen=history_size)

    # ---- the state machine ---------------------------------------------------------------

    def _resolve(self, mode: LockMode) -> LockMode | None:
        """The mode granted now, or None when the state makes ``mode`` wait."""
        state = self.state
        if state is LockState.EMPTY:
            return LockMode.RW if mode in (LockMode.RW, LockMode.RW_OR_RO) else None
        if state is LockState.COMMITTED:
            return LockMode.RW if mode is LockMode.RW else LockMode.RO
        if state is LockState.RO:
            return LockMode.RO if mode in (LockMode.RO, LockMode.RW_OR_RO) else None
        return None

    async def acquire(self, mode: LockMode, client_name: str, timeout_s: float | None) -> Session:
        granted = self._resolve(mode)
        if granted is not None:
            return self._grant(granted, client_name)
        waiter = _Waiter(mode, client_name, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self.notify(None)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter.future
        except TimeoutError:
            raise DeadlineExceeded(
                f"{mode.value} lock on {self.tag} not granted within {timeout_s:g}s: {self._describe()}"
            ) from None
        except BaseException:
            # Granted in the same instant the caller gave up: hand the lock straight back.
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result(), "left before the grant reached it")
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self.notify(None)

    def _grant(self, mode: LockMode, client_name: str) -> Session:
        before = self.state
        session = Session(self._new_id(), self.tag, mode, client_name, _now_ms())
        if mode is LockMode.RW:
            detail = ""
            if self.committed is not None:
                detail = f"cleared layout {self.committed.layout_hash:#018x}"
                self.committed.release(self.backend)
                self.committed = None
            self.building = LayoutBuilder(self.tag)
            self.writer = session
            self.state = LockState.RW
            self._record(LockEvent.RW_CONNECT, before, client_name, detail)
        else:
            self.readers[session.session_id] = session
            self.state = LockState.RO
            self._record(LockEvent.RO_CONNECT, before, client_name, f"{len(self.readers)} reader(s)")
        return session

    def release(self, session: Session, detail: str) -> tuple[LockState, bool]:
        """End ``session`` (idempotent); returns the state after and whether a build was aborted."""
        if session.ended.is_set():
            return self.state, False
        session.ended.set()
        before = self.state
        aborted = False
        if session is self.writer:
            assert self.building is not None
            self.building.release(self.backend)
            self.building = None
            self.writer = None
            self.state = LockState.EMPTY
            aborted = True
            self._record(LockEvent.RW_ABORT, before, session.client_name, detail)
        elif self.readers.pop(session.session_id, None) is not None:
            if not self.readers:
                self.state = LockState.COMMITTED
                detail = f"{detail}; last reader" if detail else "last reader"
            self._record(LockEvent.RO_DISCONNECT, before, session.client_name, detail)
        self._wake()
        return self.state, aborted

    def commit(self, session: Session) -> LayoutBuilder:
        """Publish the writer's layout and end its session."""
        if session is not self.writer or self.building is None:
            raise FailedPrecondition("only the session holding the RW lock can commit")
        layout = self.building
        layout.seal()
        before = self.state
        self.committed = layout
        self.building = None
        self.writer = None
        self.state = LockState.COMMITTED
        session.ended.set()
        self._record(
            LockEvent.RW_COMMIT,
            before,
            session.client_name,
            f"{len(layout.allocations)} allocation(s), {len(layout.metadata)} metadata entries",
        )
        self._wake()
        return layout

    def _wake(self) -> None:
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            granted = self._resolve(waiter.mode)
            if granted is None:
                continue
            self._waiters.remove(waiter)
            waiter.future.set_result(self._grant(granted, waiter.client_name))
        self.notify(None)

    def layout_of(self, session: Session) -> LayoutBuilder:
        """The layout a live session works on: the writer's own, or the committed one."""
        layout = self.building if session is self.writer else self.committed
        if session.ended.is_set() or layout is None:
            raise FailedPrecondition("this session has ended")
        return layout

    def shutdown(self, detail: str) -> None:
        """End every session and refuse every waiter (before the server stops, so that their
        calls end cleanly instead of being cancelled)."""
        for session in self.sessions():
            self.release(session, detail)
        for waiter in list(self._waiters):
            if not waiter.future.done():
                waiter.future.set_exception(Unavailable(f"the gms is {detail}"))
        self._waiters.clear()
        self.notify(None)

    def close(self) -> None:
        """Free every allocation (server shutdown); sessions end."""
        for session in [*([self.writer] if self.writer else []), *self.readers.values()]:
            session.ended.set()
        for layout in (self.building, self.committed):
            if layout is not None:
                layout.release(self.backend)
        self.building = self.committed = self.writer = None
        self.readers.clear()
        for waiter in self._waiters:
            waiter.future.cancel()
        self._waiters.clear()

    # ---- introspection -------------------------------------------------------------------

    def _record(self, event: LockEvent, before: LockState, client_name: str, detail: str) -> None:
        self.history.append(
            LockTransition(
                unix_ms=_now_ms(),
                event=event,
                from_state=before,
                to_state=self.state,
                client_name=client_name,
                detail=detail,
                layout_hash=self.committed.layout_hash if self.committed is not None else None,
            )
        )
        self.notify(event)

    def notify(self, event: LockEvent | None) -> None:
        if self._on_change is not None:
            self._on_change(self, event)

    def _describe(self) -> str:
        holders = ", ".join(repr(s.client_name) for s in self.sessions()) or "nobody"
        return f"state {self.state.value}, held by {holders}"

    def sessions(self) -> list[Session]:
        return [*([self.writer] if self.writer is not None else []), *self.readers.values()]

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def allocated_bytes(self) -> int:
        return sum(layout.allocated_bytes for layout in (self.building, self.committed) if layout is not None)

    @property
    def allocation_count(self) -> int:
        return sum(
            len(layout.allocations) for layout in (self.building, self.committed) if layout is not None
        )

    def info(self, device: str, served_tags: tuple[MemoryTag, ...]) -> GmsInfo:
        current = self.building or self.committed
        return GmsInfo(
            state=self.state,
            tag=self.tag,
            backend=self.backend.kind,
            device=device,
            layout_hash=self.committed.layout_hash if self.committed is not None else None,
            reader_count=len(self.readers),
            writer_present=self.writer is not None,
            allocation_count=self.allocation_count,
            allocated_bytes=self.allocated_bytes,
            alignment=self.backend.alignment,
            sessions=tuple(SessionInfo(s.client_name, s.mode, s.granted_unix_ms) for s in self.sessions()),
            waiting_count=self.waiting,
            metadata_count=len(current.metadata) if current is not None else 0,
            served_tags=served_tags,
        )
