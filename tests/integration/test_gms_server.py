"""The memory service through its real sockets: every transition of the lock state machine,
sessions that die (a writer SIGKILLed mid-build, a reader SIGKILLed), waiting and timeouts,
allocation retries, bad input on both sockets, introspection and metrics."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.gms import ClientProcess, GmsThread, eventually, running_gms
from tokenyard.api.gms.v1 import gms_pb2
from tokenyard.common.discovery import Instance, open_discovery
from tokenyard.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
)
from tokenyard.common.gms import (
    GmsClient,
    LockEvent,
    LockMode,
    LockState,
    MemoryTag,
    MetadataEntry,
    event_history,
    fd_socket_path,
    get_info,
    wire,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def gms() -> Iterator[GmsThread]:
    with running_gms() as server:
        yield server


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def connect(
    gms: GmsThread, mode: LockMode, name: str, timeout_s: float | None = 5.0, **kw: object
) -> GmsClient:
    return GmsClient.connect(gms.socket, mode, timeout_s=timeout_s, client_name=name, **kw)  # type: ignore[arg-type]


def build(client: GmsClient, payload: bytes, key: str = "blob") -> int:
    """Allocate, write ``payload``, describe it, commit; returns the layout hash."""
    allocation = client.allocate(len(payload))
    memory = client.map(allocation)
    memory[: len(payload)] = payload
    memory.close()
    client.put_metadata([MetadataEntry(key, allocation.allocation_id, 0, str(len(payload)).encode())])
    return client.commit()


def read(client: GmsClient, key: str = "blob") -> bytes:
    layout = client.import_layout()
    entry = layout.entry(key)
    memory = client.map(layout.allocation(entry.allocation_id))
    try:
        return bytes(memory[entry.offset : entry.offset + int(entry.value)])
    finally:
        memory.close()


def events(gms: GmsThread) -> list[LockEvent]:
    return [e.event for e in event_history(gms.socket)]


def state(gms: GmsThread, tag: MemoryTag = MemoryTag.WEIGHTS) -> LockState:
    return get_info(gms.socket, tag).state


# ---- the transitions ----------------------------------------------------------------------


def test_a_writer_commits_and_readers_share_the_layout(gms: GmsThread) -> None:
    assert state(gms) is LockState.EMPTY
    writer = connect(gms, LockMode.RW, "writer")
    assert (writer.mode, state(gms)) == (LockMode.RW, LockState.RW)
    layout_hash = build(writer, b"weights v1")
    assert not writer.is_open
    info = get_info(gms.socket)
    assert (info.state, info.layout_hash, info.allocation_count) == (LockState.COMMITTED, layout_hash, 1)

    first = connect(gms, LockMode.RO, "reader-1")
    second = connect(gms, LockMode.RO, "reader-2")
    assert first.layout_hash == second.layout_hash == layout_hash
    assert read(first) == read(second) == b"weights v1"
    info = get_info(gms.socket)
    assert (info.state, info.reader_count) == (LockState.RO, 2)
    assert sorted(s.client_name for s in info.sessions) == ["reader-1", "reader-2"]

    first.close()
    assert state(gms) is LockState.RO
    second.close()
    assert state(gms) is LockState.COMMITTED
    assert events(gms) == [
        LockEvent.RW_CONNECT,
        LockEvent.RW_COMMIT,
        LockEvent.RO_CONNECT,
        LockEvent.RO_CONNECT,
        LockEvent.RO_DISCONNECT,
        LockEvent.RO_DISCONNECT,
    ]
    history = event_history(gms.socket)
    assert history[-1].detail.endswith("last reader") and history[-1].to_state is LockState.COMMITTED
    assert all(e.layout_hash == layout_hash for e in history[1:])


def test_a_writer_on_a_committed_layout_clears_it_but_old_mappings_stay_valid(gms: GmsThread) -> None:
    old_hash = build(connect(gms, LockMode.RW, "first"), b"old weights")
    reader = connect(gms, LockMode.RO, "reader")
    layout = reader.import_layout()
    old_memory = reader.map(layout.allocations[0])
    reader.close()

    writer = connect(gms, LockMode.RW, "second")
    history = event_history(gms.socket)
    assert history[-1].event is LockEvent.RW_CONNECT and history[-1].from_state is LockState.COMMITTED
    assert history[-1].detail == f"cleared layout {old_hash:#018x}"
    assert get_info(gms.socket).allocation_count == 0
    new_hash = build(writer, b"new weights!", key="other")
    assert new_hash != old_hash

    with connect(gms, LockMode.RO, "reader") as fresh:
        assert read(fresh, "other") == b"new weights!"
        with pytest.raises(NotFound):
            fresh.get_metadata("blob")
    # The gms gave the old memory up; the mapping keeps it alive for whoever still holds it.
    assert bytes(old_memory[:11]) == b"old weights"
    old_memory.close()


def test_ro_waits_for_a_commit_and_rw_waits_for_the_last_reader(
    gms: GmsThread, pool: ThreadPoolExecutor
) -> None:
    with pytest.raises(DeadlineExceeded, match="state empty"):
        connect(gms, LockMode.RO, "early reader", timeout_s=0.2)
    writer = connect(gms, LockMode.RW, "writer")
    waiting: Future[GmsClient] = pool.submit(connect, gms, LockMode.RO, "patient reader", 10.0)
    eventually(lambda: get_info(gms.socket).waiting_count == 1, "the reader waits")
    assert not waiting.done()
    build(writer, b"payload")
    reader = waiting.result(10)
    assert reader.mode is LockMode.RO and read(reader) == b"payload"

    waiting_writer: Future[GmsClient] = pool.submit(connect, gms, LockMode.RW, "next writer", 10.0)
    eventually(lambda: get_info(gms.socket).waiting_count == 1, "the writer waits for the reader")
    # A reader may still join while a writer waits: RO connect in RO is allowed.
    late = connect(gms, LockMode.RO, "late reader", timeout_s=1)
    reader.close()
    late.close()
    writer_two = waiting_writer.result(10)
    assert writer_two.mode is LockMode.RW and state(gms) is LockState.RW
    writer_two.close()
    assert state(gms) is LockState.EMPTY


def test_rw_or_ro_writes_first_then_reads_and_takes_over_an_aborted_build(
    gms: GmsThread, pool: ThreadPoolExecutor
) -> None:
    first = connect(gms, LockMode.RW_OR_RO, "engine-1")
    assert first.mode is LockMode.RW
    second: Future[GmsClient] = pool.submit(connect, gms, LockMode.RW_OR_RO, "engine-2", 10.0)
    eventually(lambda: get_info(gms.socket).waiting_count == 1, "engine-2 waits while engine-1 builds")
    first.close()  # engine-1 gives up: engine-2 must build instead of waiting for ever
    builder = second.result(10)
    assert builder.mode is LockMode.RW
    assert events(gms)[-2:] == [LockEvent.RW_ABORT, LockEvent.RW_CONNECT]

    third: Future[GmsClient] = pool.submit(connect, gms, LockMode.RW_OR_RO, "engine-3", 10.0)
    eventually(lambda: get_info(gms.socket).waiting_count == 1, "engine-3 waits")
    layout_hash = build(builder, b"built by engine-2")
    reader = third.result(10)
    assert (reader.mode, reader.layout_hash) == (LockMode.RO, layout_hash)
    with connect(gms, LockMode.RW_OR_RO, "engine-4") as fourth:
        assert fourth.mode is LockMode.RO and read(fourth) == b"built by engine-2"
    reader.close()


def test_a_writer_killed_mid_build_leaves_nothing_visible(gms: GmsThread) -> None:
    committed = build(connect(gms, LockMode.RW, "first build"), b"the committed layout")
    victim = ClientProcess(
        gms.socket,
        """
        allocation = client.allocate(1 << 20)
        memory = client.map(allocation)
        memory[:4] = b"half"
        client.put_metadata([MetadataEntry("blob", allocation.allocation_id, 0, b"4")])
        """,
        mode="rw",
        client_name="victim",
    )
    try:
        victim.wait_ready()
        info = get_info(gms.socket)
        assert (info.state, info.writer_present, info.allocation_count) == (LockState.RW, True, 1)
        assert info.layout_hash is None  # the old layout was cleared when the victim connected
    finally:
        victim.kill()
    eventually(lambda: state(gms) is LockState.EMPTY, "the killed writer's build is aborted", timeout=5)
    info = get_info(gms.socket)
    assert (info.allocation_count, info.allocated_bytes, info.metadata_count) == (0, 0, 0)
    last = event_history(gms.socket)[-1]
    assert (last.event, last.client_name, last.detail) == (LockEvent.RW_ABORT, "victim", "disconnected")
    # Nothing half-built can be read: no reader is let in until a new build commits.
    with pytest.raises(DeadlineExceeded):
        connect(gms, LockMode.RO, "reader", timeout_s=0.2)
    rebuilt = build(connect(gms, LockMode.RW_OR_RO, "rebuilder"), b"the committed layout")
    assert rebuilt == committed  # same structure, same hash
    with connect(gms, LockMode.RO, "reader") as reader:
        assert read(reader) == b"the committed layout"


def test_a_reader_killed_is_the_last_reader_out(gms: GmsThread) -> None:
    build(connect(gms, LockMode.RW, "writer"), b"x")
    victim = ClientProcess(gms.socket, "client.import_layout()", mode="ro", client_name="doomed reader")
    try:
        victim.wait_ready()
        assert get_info(gms.socket).reader_count == 1
    finally:
        victim.kill()
    eventually(lambda: state(gms) is LockState.COMMITTED, "the killed reader released the lock", timeout=5)
    assert events(gms)[-1] is LockEvent.RO_DISCONNECT


def test_a_lock_wait_times_out_naming_the_holder(gms: GmsThread) -> None:
    with connect(gms, LockMode.RW, "busy writer"):
        with pytest.raises(DeadlineExceeded, match="'busy writer'"):
            connect(gms, LockMode.RW, "second", timeout_s=0.2)
        assert get_info(gms.socket).waiting_count == 0


# ---- bad input ------------------------------------------------------------------------------


def test_bad_requests_get_clear_errors_and_change_nothing(gms: GmsThread) -> None:
    writer = connect(gms, LockMode.RW, "writer")
    allocation = writer.allocate(100, layout_slot=3)
    assert (allocation.aligned_size, allocation.layout_slot) == (4096, 3)
    with pytest.raises(NotFound, match="allocation 999"):
        writer.put_metadata([MetadataEntry("w", 999, 0, b"")])
    with pytest.raises(InvalidArgument, match="past the end"):
        writer.put_metadata([MetadataEntry("w", allocation.allocation_id, 4096, b"")])
    with pytest.raises(NotFound, match="no allocation 999"):
        writer.fd(999)
    with pytest.raises(InvalidArgument, match="positive"):
        writer.allocate(0)
    with pytest.raises(AlreadyExists, match="slot 3"):
        writer.allocate(10, layout_slot=3)
    with pytest.raises(NotFound, match="no metadata"):
        writer.get_metadata("absent")
    assert writer.allocate(10).layout_slot == 4
    layout_hash = build(writer, b"ok")

    reader = connect(gms, LockMode.RO, "reader")
    for call in (
        lambda: reader.allocate(10),
        lambda: reader.commit(),
        lambda: reader.delete_metadata(["blob"]),
    ):
        with pytest.raises(FailedPrecondition, match="needs the RW lock"):
            call()
    with pytest.raises(FailedPrecondition, match="stale layout"):
        reader.import_layout(expected_hash=layout_hash ^ 1)
    assert reader.import_layout(expected_hash=layout_hash).layout_hash == layout_hash
    reader.close()
    with pytest.raises(FailedPrecondition, match="session has ended"):
        reader.import_layout()
    with pytest.raises(FailedPrecondition, match="serves weights, not kv_cache"):
        connect(gms, LockMode.RW, "kv", tag=MemoryTag.KV_CACHE)
    assert get_info(gms.socket).state is LockState.COMMITTED


def test_an_unknown_session_gets_no_descriptor(gms: GmsThread) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(fd_socket_path(gms.socket))
        request = gms_pb2.FdRequest(session_id="forged", allocation_id=1).SerializeToString()
        sock.sendall(wire.encode_frame(request))
        reply, fds = _frame(sock)
    assert not fds
    assert reply.code == 5 and "no such session" in reply.message


def _frame(sock: socket.socket) -> tuple[gms_pb2.FdResponse, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
    (length,) = struct.unpack(">I", data[:4])
    return gms_pb2.FdResponse.FromString(data[4 : 4 + length]), fds


def _closed(sock: socket.socket) -> bool:
    """The server closed the connection (a reset when it left our bytes unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_garbage_on_either_socket_does_not_disturb_other_clients(gms: GmsThread) -> None:
    holder = connect(gms, LockMode.RW, "holder")
    allocation = holder.allocate(4096)
    # A frame claiming 1 GiB, an HTTP request, random bytes, and a half frame on the
    # descriptor socket; an HTTP/1 request and random bytes on the gRPC socket.
    for garbage in (struct.pack(">I", 1 << 30), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(fd_socket_path(gms.socket))
            sock.sendall(garbage)
            reply, fds = _frame(sock)
            assert reply.code == 3 and "bad frame" in reply.message and not fds
            assert _closed(sock)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(fd_socket_path(gms.socket))
        sock.sendall(struct.pack(">I", 8) + b"\xff\xff\xff\xff\xff\xff\xff\xff")
        reply, _ = _frame(sock)
        assert reply.code == 3
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(gms.socket)
            sock.sendall(garbage)
            sock.settimeout(5)
            while sock.recv(4096):
                pass
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(fd_socket_path(gms.socket))
    half.sendall(b"\x00\x00")
    try:
        # The holder's session and descriptors are untouched, and newcomers are served.
        memory = holder.map(allocation)
        memory[:2] = b"ok"
        memory.close()
        assert get_info(gms.socket).writer_present
        build(holder, b"still fine")
        with connect(gms, LockMode.RO, "newcomer") as reader:
            assert read(reader) == b"still fine"
    finally:
        half.close()


# ---- memory ---------------------------------------------------------------------------------


def test_an_allocation_waits_for_memory_and_gives_up_after_the_retry_timeout(
    pool: ThreadPoolExecutor,
) -> None:
    with running_gms(
        tags="weights,kv_cache", max_bytes=3 * 4096, alloc_retry_interval=0.02, alloc_retry_timeout=10
    ) as gms:
        weights = connect(gms, LockMode.RW, "weights writer")
        weights.allocate(2 * 4096)
        kv = connect(gms, LockMode.RW, "kv writer", tag=MemoryTag.KV_CACHE)
        kv.allocate(4096)
        pending = pool.submit(kv.allocate, 4096)
        eventually(
            lambda: _sample(gms, "tokenyard_gms_allocation_retries_total", tag="kv_cache") >= 2, "retries"
        )
        assert not pending.done()
        weights.close()  # frees two pages: the retry succeeds
        assert pending.result(10).size == 4096
        kv.close()

    with running_gms(max_bytes=4096, alloc_retry_interval=0.02, alloc_retry_timeout=0.2) as gms:
        writer = connect(gms, LockMode.RW, "writer")
        writer.allocate(4096)
        with pytest.raises(Overloaded, match="alloc-retry-timeout"):
            writer.allocate(1)
        with pytest.raises(InvalidArgument, match="never fit"):
            writer.allocate(8192)
        assert _sample(gms, "tokenyard_gms_allocation_failures_total", tag="weights") == 1
        writer.close()


def _metrics_text(gms: GmsThread) -> str:
    async def listing() -> list[Instance]:
        discovery = open_discovery(gms.settings.discovery)
        try:
            return list(await discovery.instances("gms"))
        finally:
            await discovery.close()

    instance = asyncio.run(listing())[0]
    with urllib.request.urlopen(f"http://{instance.metrics_address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _sample(gms: GmsThread, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(_metrics_text(gms)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_metrics_show_bytes_state_and_clients_per_tag(gms: GmsThread) -> None:
    build(connect(gms, LockMode.RW, "writer"), b"x" * 5000)
    reader = connect(gms, LockMode.RO, "reader")
    reader.map(reader.import_layout().allocations[0]).close()
    assert _sample(gms, "tokenyard_gms_allocated_bytes", tag="weights") == 8192
    assert _sample(gms, "tokenyard_gms_allocations", tag="weights") == 1
    assert _sample(gms, "tokenyard_gms_lock_state", tag="weights", state="ro") == 1
    assert _sample(gms, "tokenyard_gms_lock_state", tag="weights", state="committed") == 0
    assert _sample(gms, "tokenyard_gms_clients", tag="weights", mode="ro") == 1
    assert _sample(gms, "tokenyard_gms_lock_transitions_total", tag="weights", event="rw_commit") == 1
    assert _sample(gms, "tokenyard_gms_descriptors_sent_total", tag="weights", mode="ro") == 1
    reader.close()
    assert _sample(gms, "tokenyard_gms_clients", tag="weights", mode="ro") == 0
