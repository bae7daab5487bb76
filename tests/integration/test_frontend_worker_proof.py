"""The frontend's proof of worker records (mTLS deployments), against a real gRPC worker server:
a record enters the model registry once the worker at its address answers ``Describe`` with the
model the record names; a record naming another model, or an address where nothing answers, stays
out (and is asked again); a record that leaves is forgotten."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Instance, ModelCard, WatchEventKind
from tokenyard.common.tls import PLAINTEXT
from tokenyard.frontend.worker_proof import WorkerProof

pytestmark = pytest.mark.integration


class Describing(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, model: str) -> None:
        self.model = model
        self.calls = 0

    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: Any
    ) -> worker_pb2.DescribeResponse:
        self.calls += 1
        return worker_pb2.DescribeResponse(model_card=worker_pb2.ModelCard(name=self.model))


@contextlib.asynccontextmanager
async def worker_server(model: str) -> AsyncIterator[tuple[str, Describing]]:
    servicer = Describing(model)  # type: ignore[abstract]  # serves only what the proof calls
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


def record(worker_id: int, address: str, model: str) -> Instance:
    card = ModelCard(model, "smollm2", 16, 4096, 100, "mocker", "aggregated")
    return Instance(worker_id, "worker", "aggregated", address, model_card=card)


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_only_records_their_workers_confirm_reach_the_registry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    applied: list[tuple[WatchEventKind, int]] = []
    proof = WorkerProof(
        PLAINTEXT, lambda kind, inst: applied.append((kind, inst.instance_id)), retry_every=0.05
    )
    async with worker_server("real") as (address, servicer):
        try:
            proof.on_event(WatchEventKind.ADDED, record(1, address, "real"))
            proof.on_event(WatchEventKind.ADDED, record(2, address, "fake"))  # a forged record
            proof.on_event(WatchEventKind.ADDED, record(3, dead_address(), "real"))
            for _ in range(100):
                if applied:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # several retries of the two others
            assert applied == [(WatchEventKind.ADDED, 1)]
            assert servicer.calls >= 3  # the forged record was asked again
            assert any("its record names 'fake'" in r.getMessage() for r in caplog.records)
            # Updates of a proven worker apply at once; removals always.
            proof.on_event(WatchEventKind.UPDATED, record(1, address, "real"))
            proof.on_event(WatchEventKind.REMOVED, record(2, address, "fake"))
            assert applied[1:] == [(WatchEventKind.UPDATED, 1), (WatchEventKind.REMOVED, 2)]
            await asyncio.sleep(0.1)  # a question already on its way may still arrive
            calls = servicer.calls
            await asyncio.sleep(0.3)  # six retries' worth, had the record not been forgotten
            assert servicer.calls == calls
        finally:
            await proof.close()
