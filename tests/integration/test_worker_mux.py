"""GenerateMux end to end: the frontend's WorkerMux against an in-process worker on the mocker, over
real gRPC. Many requests share one call; each stream gets exactly a Generate call's tokens, its own
errors and deadline; cancelling a stream frees its request; a worker that goes away fails the
streams in flight as a lost worker (UNAVAILABLE, which the pipeline migrates)."""

from __future__ import annotations

import asyncio

import pytest

from tests.fixtures.worker import eventually, generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2_grpc
from tokenyard.common.errors import DeadlineExceeded, InvalidArgument, TokenyardError, Unavailable
from tokenyard.frontend.generation import FinishReason, TokenChunk
from tokenyard.frontend.worker_mux import MuxStream, WorkerMux
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.executor import pseudo_token, request_seed

pytestmark = pytest.mark.integration

FAST = MockerConfig(speedup_ratio=0, block_size=4, num_gpu_blocks=256, max_model_len=512)
REAL_TIME = MockerConfig(speedup_ratio=1, block_size=4, num_gpu_blocks=2048)


def expected_tokens(request_id: str, prompt_len: int, n: int) -> list[int]:
    s = request_seed(request_id)
    return [pseudo_token(s, prompt_len + k, FAST.vocab_size) for k in range(n)]


async def drain(stream: MuxStream) -> list[TokenChunk]:
    return [chunk async for chunk in stream]


async def test_requests_share_one_call_and_get_their_own_tokens() -> None:
    async with running_worker(FAST) as w:
        mux = WorkerMux(w.server.address, worker_pb2_grpc.WorkerServiceStub(w.channel))
        try:
            streams = [mux.open(generate_request(f"m{i}", range(10 + i), 20 + i), 30.0) for i in range(5)]
            results = await asyncio.gather(*(drain(s) for s in streams))
        finally:
            await mux.close()
    for i, chunks in enumerate(results):
        *middle, last = chunks
        assert [t for c in chunks for t in c.token_ids] == expected_tokens(f"m{i}", 10 + i, 20 + i)
        assert all(c.finish_reason is None and c.token_ids for c in middle)
        assert last.finish_reason is FinishReason.LENGTH
        assert last.usage is not None and last.usage.completion_tokens == 20 + i


async def test_a_refused_request_ends_its_stream_only() -> None:
    async with running_worker(FAST) as w:
        mux = WorkerMux(w.server.address, worker_pb2_grpc.WorkerServiceStub(w.channel))
        try:
            bad = mux.open(generate_request("bad", []), 30.0)
            good = mux.open(generate_request("good", range(8), 6), 30.0)
            with pytest.raises(InvalidArgument, match="token_ids must not be empty"):
                await drain(bad)
            chunks = await drain(good)
            # The same id again, on the same call, after the first one ended: a new request.
            again = await drain(mux.open(generate_request("good", range(8), 6), 30.0))
        finally:
            await mux.close()
    assert [t for c in chunks for t in c.token_ids] == expected_tokens("good", 8, 6)
    assert [t for c in again for t in c.token_ids] == expected_tokens("good", 8, 6)


async def test_cancelling_a_stream_aborts_its_request_on_the_worker() -> None:
    async with running_worker(REAL_TIME) as w:
        mux = WorkerMux(w.server.address, worker_pb2_grpc.WorkerServiceStub(w.channel))
        try:
            stream = mux.open(generate_request("long", range(100), 5000), 60.0)
            first = await stream.__anext__()
            assert first.token_ids and await w.active_blocks() > 0
            stream.cancel()

            async def freed() -> bool:
                return w.server.intake.in_flight == 0 and await w.active_blocks() == 0

            await eventually(freed, "the cancelled request left the worker")
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            # The call itself goes on serving.
            rest = await drain(mux.open(generate_request("after", range(10), 3), 60.0))
            assert rest[-1].finish_reason is FinishReason.LENGTH
        finally:
            await mux.close()


async def test_a_request_past_its_deadline_ends_with_deadline_exceeded() -> None:
    async with running_worker(REAL_TIME) as w:
        mux = WorkerMux(w.server.address, worker_pb2_grpc.WorkerServiceStub(w.channel))
        try:
            stream = mux.open(generate_request("slow", range(100), 5000), 0.3)
            with pytest.raises(DeadlineExceeded):
                await drain(stream)

            async def freed() -> bool:
                return w.server.intake.in_flight == 0

            await eventually(freed, "the expired request left the worker")
        finally:
            await mux.close()


async def test_a_worker_that_goes_away_fails_the_streams_in_flight_as_unavailable() -> None:
    stream: MuxStream | None = None
    mux: WorkerMux | None = None
    chunks: list[TokenChunk] = []
    error: TokenyardError | None = None
    async with running_worker(REAL_TIME, grace_period=0.5) as w:
        mux = WorkerMux(w.server.address, worker_pb2_grpc.WorkerServiceStub(w.channel))
        stream = mux.open(generate_request("orphan", range(50), 100000), 60.0)
        chunks.append(await stream.__anext__())
    # The worker stopped (its grace period ran out with the request still running).
    try:
        async for chunk in stream:
            chunks.append(chunk)
    except TokenyardError as exc:
        error = exc
    await mux.close()
    assert isinstance(error, Unavailable), error
    assert chunks and all(c.finish_reason is None for c in chunks)
