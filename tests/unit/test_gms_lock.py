"""The gms lock table and layout hash as pure logic (the real server's behaviour is in
tests/integration/test_gms_server.py)."""

from __future__ import annotations

import asyncio

import pytest

from tokenyard.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from tokenyard.common.gms.types import Allocation, LockEvent, LockMode, LockState, MemoryTag, MetadataEntry
from tokenyard.gms.backend import SharedMemoryBackend
from tokenyard.gms.layout import LayoutBuilder, layout_hash
from tokenyard.gms.lock import LockDomain, Session

pytestmark = pytest.mark.unit

RW, RO, AUTO = LockMode.RW, LockMode.RO, LockMode.RW_OR_RO
# state -> what RW, RO and RW_OR_RO connects get (None: they wait), as in the reference's table.
TABLE = {
    LockState.EMPTY: (RW, None, RW),
    LockState.RW: (None, None, None),
    LockState.COMMITTED: (RW, RO, RO),
    LockState.RO: (None, RO, RO),
}


def domain() -> LockDomain:
    counter = iter(range(1, 1_000_000))
    return LockDomain(MemoryTag.WEIGHTS, SharedMemoryBackend(reserve=False), lambda: f"s{next(counter)}")


async def _into(state: LockState) -> LockDomain:
    d = domain()
    if state is LockState.EMPTY:
        return d
    writer = await d.acquire(RW, "w", None)
    if state is LockState.RW:
        return d
    d.commit(writer)
    if state is LockState.RO:
        await d.acquire(RO, "r", None)
    return d


@pytest.mark.parametrize("state", list(TABLE))
async def test_each_state_grants_exactly_what_the_table_says(state: LockState) -> None:
    for mode, expected in zip((RW, RO, AUTO), TABLE[state], strict=True):
        d = await _into(state)
        assert d.state is state
        if expected is None:
            with pytest.raises(DeadlineExceeded):
                await d.acquire(mode, "probe", 0.01)
            assert d.state is state and d.waiting == 0
        else:
            session = await d.acquire(mode, "probe", 0.01)
            assert session.mode is expected
            assert d.state is (LockState.RW if expected is RW else LockState.RO)


async def test_abort_commit_and_last_reader_out() -> None:
    d = domain()
    writer = await d.acquire(RW, "w", None)
    assert d.release(writer, "unlocked") == (LockState.EMPTY, True)
    assert d.release(writer, "again") == (LockState.EMPTY, False)  # idempotent
    writer = await d.acquire(RW, "w", None)
    with pytest.raises(FailedPrecondition):
        d.commit(Session("stranger", MemoryTag.WEIGHTS, RW, "stranger", 0))
    d.commit(writer)
    readers = [await d.acquire(RO, f"r{i}", None) for i in range(2)]
    assert d.release(readers[0], "") == (LockState.RO, False)
    assert d.release(readers[1], "") == (LockState.COMMITTED, False)
    assert [e.event for e in d.history] == [
        LockEvent.RW_CONNECT,
        LockEvent.RW_ABORT,
        LockEvent.RW_CONNECT,
        LockEvent.RW_COMMIT,
        LockEvent.RO_CONNECT,
        LockEvent.RO_CONNECT,
        LockEvent.RO_DISCONNECT,
        LockEvent.RO_DISCONNECT,
    ]


async def test_waiters_are_decided_again_after_every_transition() -> None:
    d = domain()
    writer = await d.acquire(RW, "w", None)
    auto = asyncio.ensure_future(d.acquire(AUTO, "auto", 5))
    reader = asyncio.ensure_future(d.acquire(RO, "reader", 5))
    await asyncio.sleep(0)
    assert d.waiting == 2
    d.release(writer, "gave up")  # EMPTY: the RW_OR_RO waiter builds, the reader still waits
    builder = await auto
    assert builder.mode is RW and not reader.done()
    d.commit(builder)
    assert (await reader).mode is RO


async def test_a_waiter_cancelled_as_it_is_granted_hands_the_lock_back() -> None:
    d = domain()
    writer = await d.acquire(RW, "w", None)
    waiting = asyncio.ensure_future(d.acquire(RW, "next", 5))
    await asyncio.sleep(0)
    d.release(writer, "")  # grants the waiter ...
    waiting.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert d.state is LockState.EMPTY and d.writer is None


def _alloc(allocation_id: int, slot: int, size: int = 100) -> Allocation:
    return Allocation(allocation_id, size, 4096, MemoryTag.WEIGHTS, slot)


def test_the_layout_hash_covers_structure_not_ids() -> None:
    entries = [MetadataEntry("t", 1, 64, b"float32")]
    base = layout_hash([_alloc(1, 0)], entries)
    assert layout_hash([_alloc(7, 0)], [MetadataEntry("t", 7, 64, b"float32")]) == base
    assert layout_hash([_alloc(1, 1)], entries) != base
    assert layout_hash([_alloc(1, 0, size=101)], entries) != base
    assert layout_hash([_alloc(1, 0)], [MetadataEntry("t", 1, 128, b"float32")]) != base
    assert layout_hash([_alloc(1, 0)], [MetadataEntry("t", 1, 64, b"float16")]) != base
    assert layout_hash([_alloc(1, 0)], [MetadataEntry("u", 1, 64, b"float32")]) != base


def test_a_bad_metadata_batch_changes_nothing() -> None:
    layout = LayoutBuilder(MemoryTag.WEIGHTS)
    backend = SharedMemoryBackend(reserve=False)
    layout.add(_alloc(1, 0), backend.create(4096))
    with pytest.raises(NotFound):
        layout.put([MetadataEntry("ok", 1, 0, b""), MetadataEntry("bad", 2, 0, b"")])
    with pytest.raises(InvalidArgument):
        layout.put([MetadataEntry("", 1, 0, b"")])
    assert layout.metadata == {}
    layout.release(backend)
    assert backend.allocated == 0
