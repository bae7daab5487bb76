"""The decode side of KV transfer: pulling a prompt's blocks from the prefill worker that holds them.

A decode worker that receives a Generate with ``disaggregation.kv_transfer`` calls the source's
``FetchKvBlocks`` (a server stream, one block per message, a large block in parts) with
``release``, so that the prefill worker frees its copy once the stream is complete. gRPC's HTTP/2
flow control bounds the bytes in flight; the call has a deadline. One channel per source address is
kept (a small pool, least recently used first out, closed when the worker stops), so consecutive
transfers from one prefill worker reuse its connection.

Every failure is a :class:`FetchFailed` with a reason from
:data:`~tokenyard.worker.metrics.FALLBACK_REASONS`; the caller then computes the prompt itself.
Cancelling the caller cancels the call.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.tls import PLAINTEXT, Tls
from tokenyard.worker.engines.base import KvBlockExport, KvBlockLayout, KvTransferParams

FETCH_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest FetchKvBlocks message a decode worker accepts. Exporters send a block in parts of at
most :data:`~tokenyard.worker.servicer.KV_PART_BYTES` (1 MiB); the margin admits an exporter
with a larger part size, and nothing unbounded."""

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", FETCH_MESSAGE_BYTES),
    # The request is a transfer id and the hashes to fetch (9 bytes each): small.
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    # Transfers come in bursts; keep the connection to a prefill worker up in between, within
    # the servers' ping policy (10 s minimum between pings).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)

_REASONS = {
    grpc.StatusCode.UNAVAILABLE: "unreachable",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.UNIMPLEMENTED: "unsupported",
}


class FetchFailed(Exception):
    """The blocks could not be fetched; ``reason`` is one of the fallback reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Fetched:
    export: KvBlockExport
    nbytes: int
    seconds: float


@dataclass(slots=True)
class _Entry:
    channel: grpc.aio.Channel
    users: int = 0


class ChannelPool:
    """One channel per address, at most ``max_channels`` idle ones kept (least recently used
    closed first); a channel in use is never closed under its caller."""

    def __init__(self, max_channels: int = 32, tls: Tls = PLAINTEXT) -> None:
        if max_channels < 1:
            raise ValueError("max_channels must be positive")
        self._max = max_channels
        self._tls = tls
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def channel(self, address: str) -> AsyncIterator[grpc.aio.Channel]:
        if self._closed:
            raise FetchFailed("error", "the worker is shutting down")
        entry = self._entries.get(address)
        if entry is None:
            try:
                # With mTLS, only an instance holding a worker certificate gets through.
                channel = self._tls.channel(address, "worker", CHANNEL_OPTIONS)
            except Exception as exc:  # a target gRPC cannot even parse
                raise FetchFailed("unreachable", f"cannot open a channel to {address!r}: {exc}") from None
            entry = self._entries[address] = _Entry(channel)
        self._entries.move_to_end(address)
        entry.users += 1
        try:
            yield entry.channel
        finally:
            entry.users -= 1
            await self._trim()

    async def _trim(self) -> None:
        excess = len(self._entries) - self._max
        for address in list(self._entries):
            if excess <= 0:
                break
            entry = self._entries[address]
            if entry.users == 0:
                del self._entries[address]
                excess -= 1
                await entry.channel.close(None)

    async def aclose(self) -> None:
        self._closed = True
        entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            await entry.channel.close(None)


class KvFetcher:
    """Fetches transfers over a :class:`ChannelPool`."""

    def __init__(self, *, timeout_s: float, max_channels: int = 32, tls: Tls = PLAINTEXT) -> None:
        self.timeout_s = timeout_s
        self.channels = ChannelPool(max_channels, tls)

    async def fetch(
        self,
        params: KvTransferParams,
        block_hashes: Sequence[int],
        *,
        layout: KvBlockLayout,
        block_bytes: int,
    ) -> Fetched:
        """The blocks ``block_hashes`` (a non-empty subset of the transfer's, in prompt order; empty:
        every block) of transfer ``params``, checked against the importer's ``layout`` and
        ``block_bytes``; the source releases the transfer once the stream is complete."""
        started = time.perf_counter()
        wanted = list(block_hashes) or list(params.block_hashes)
        request = worker_pb2.FetchKvBlocksRequest(
            transfer_id=params.transfer_id, block_hashes=block_hashes, release=True
        )
        async with self.channels.channel(params.source_address) as channel:
            call = worker_pb2_grpc.WorkerServiceStub(channel).FetchKvBlocks(request, timeout=self.timeout_s)
            try:
                blocks = await _receive(call, wanted, layout, block_bytes)
            except grpc.aio.AioRpcError as err:
                reason = _REASONS.get(err.code(), "error")
                raise FetchFailed(reason, f"{err.code().name}: {err.details()}") from None
            finally:
                # Leaving early (a bad stream, a cancelled caller) must end the call too.
                if not call.done():
                    call.cancel()
        return Fetched(
            KvBlockExport(layout, tuple(blocks)), len(blocks) * block_bytes, time.perf_counter() - started
        )

    async def aclose(self) -> None:
        await self.channels.aclose()


def _layout(message: worker_pb2.KvBlockLayout) -> KvBlockLayout:
    return KvBlockLayout(
        num_layers=message.num_layers,
        num_kv_heads=message.num_kv_heads,
        head_dim=message.head_dim,
        block_size=message.block_size,
        dtype=message.dtype,
        layout_hash=message.layout_hash,
    )


async def _receive(
    call: Any, wanted: list[int], layout: KvBlockLayout, block_bytes: int
) -> list[tuple[int, bytes]]:
    """Reassemble the stream into ``(hash, bytes)`` per block, checking every message against what
    was asked for: order, hashes, layout, sizes. FetchFailed("invalid_response" or
    "layout_mismatch") at the first message that does not fit."""
    blocks: list[tuple[int, bytes]] = []
    part: bytearray | None = None
    first = True
    async for message in call:
        if first:
            first = False
            if not message.HasField("layout"):
                raise FetchFailed("invalid_response", "the first message carries no layout")
            theirs = _layout(message.layout)
            if theirs != layout:
                raise FetchFailed(
                    "layout_mismatch", f"the source's KV layout {theirs} is not this engine's {layout}"
                )
        index = len(blocks)
        if index >= len(wanted):
            raise FetchFailed("invalid_response", f"more blocks than the {len(wanted)} asked for")
        if message.block_index != index or message.block_hash != wanted[index]:
            raise FetchFailed(
                "invalid_response",
                f"block {message.block_index} ({message.block_hash:#018x}) where block {index} "
                f"({wanted[index]:#018x}) was due",
            )
        data = message.data
        if not message.block_bytes:  # the whole block in one message
            if part is not None or message.offset:
                raise FetchFailed("invalid_response", f"block {index} mixes a whole message with parts")
            if len(data) != block_bytes:
                raise FetchFailed(
                    "invalid_response", f"block {index} has {len(data)} bytes, expected {block_bytes}"
                )
            blocks.append((wanted[index], data))
            continue
        if message.block_bytes != block_bytes:
            raise FetchFailed(
                "invalid_response", f"block {index} has {message.block_bytes} bytes, expected {block_bytes}"
            )
        if part is None:
            part = bytearray()
        if message.offset != len(part) or not data or len(part) + len(data) > block_bytes:
            raise FetchFailed(
                "invalid_response",
                f"block {index}: a part of {len(data)} bytes at offset {message.offset}, after {len(part)} bytes",
            )
        part += data
        if len(part) == block_bytes:
            blocks.append((wanted[index], bytes(part)))
            part = None
    if part is not None or len(blocks) != len(wanted):
        raise FetchFailed("invalid_response", f"the stream ended after {len(blocks)} of {len(wanted)} blocks")
    return blocks
