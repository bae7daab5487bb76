"""GenerateMux end to end: the frontend's WorkerMux against an in-process worker on the mocker, over
real gRPC. Many requests share one call; each stream gets exactly a Generate call's tokens, its own
errors and deadline; cancelling a stream frees its request; a worker that goes away fails the
streams in flight as a lost worker (UNAVAILABLE, which the pipeline migrates)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.fixtures.worker import eventually, generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.errors import DeadlineExceeded, InvalidArgument, TokenyardError, Unavailable
from tokenyard.common.logs import _ContextFilter, _JsonFormatter, request_id_var
from tokenyard.frontend.clients import CHANNEL_OPTIONS
from tokenyard.frontend.generation import FinishReason, TokenChunk
from tokenyard.frontend.worker_mux import MuxStream, WorkerMux
from tokenyard.worker.engines.base import EngineRequest
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.executor import pseudo_token, request_seed
from tokenyard.worker.intake import Output

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

            # Tokens that arrived before the cancel and were not read yet are not handed out
            # after it: wait for some, so that this does not depend on timing.
            async def more_arrived() -> bool:
                return bool(stream._tokens)

            await eventually(more_arrived, "more tokens arrived before the cancel")
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


async def test_many_large_opens_queued_together_go_in_messages_under_the_limit() -> None:
    # Opens that gather behind one write pass together the 64 MiB both ends accept. Their size is
    # what matters here, not what makes it: a long LoRA name costs neither end the work of as long
    # a prompt (the worker refuses the name, but each request alone, as it would a Generate call).
    name = "x" * (7 * 1024 * 1024)
    async with (
        running_worker(FAST) as w,
        grpc.aio.insecure_channel(w.server.address, options=CHANNEL_OPTIONS) as channel,
    ):
        mux = WorkerMux(w.server.address, worker_pb2_grpc.WorkerServiceStub(channel))
        try:
            large = [generate_request(f"big{i}", range(8), 4) for i in range(10)]
            for request in large:
                request.lora_name = name
            # One open larger than a message may be fails alone.
            huge = generate_request("huge", range(8), 4)
            huge.lora_name = "x" * (65 * 1024 * 1024)
            streams = [mux.open(request, 60.0) for request in large]
            too_large = mux.open(huge, 60.0)
            good = mux.open(generate_request("good", range(8), 4), 60.0)
            for stream in streams:
                with pytest.raises(InvalidArgument, match="lora_name: at most"):
                    await drain(stream)
            with pytest.raises(InvalidArgument, match="more than"):
                await drain(too_large)
            chunks = await drain(good)
            # The call goes on serving.
            after = await drain(mux.open(generate_request("after", range(8), 3), 60.0))
        finally:
            await mux.close()
    assert [t for c in chunks for t in c.token_ids] == expected_tokens("good", 8, 4)
    assert [t for c in after for t in c.token_ids] == expected_tokens("after", 8, 3)


async def test_an_unexpected_error_ends_its_stream_generic_and_logged_under_its_request_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    async with running_worker(FAST) as w:
        generate = w.server.intake.generate

        async def broken(model: str, request: EngineRequest) -> AsyncIterator[Output]:
            if request.request_id == "fine":
                async for output in generate(model, request):
                    yield output
            else:
                raise RuntimeError("secret at /srv/engine")

        monkeypatch.setattr(w.server.intake, "generate", broken)
        mux = WorkerMux(w.server.address, worker_pb2_grpc.WorkerServiceStub(w.channel))
        try:
            good = mux.open(generate_request("fine", range(8), 4), 30.0)
            # The frontend opens a request's stream in that request's log context.
            token = request_id_var.set("req-7f3a")
            try:
                bad = mux.open(generate_request("worker-id-of-req-7f3a", range(8), 4), 30.0)
            finally:
                request_id_var.reset(token)
            with pytest.raises(TokenyardError) as raised:
                await drain(bad)
            chunks = await drain(good)
        finally:
            await mux.close()
            root.removeHandler(handler)
    # What a Generate call's interceptor would answer: no exception text leaves the worker.
    assert raised.value.code is grpc.StatusCode.INTERNAL
    assert str(raised.value) == "internal error (request id req-7f3a)"
    assert [t for c in chunks for t in c.token_ids] == expected_tokens("fine", 8, 4)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    failed = [line for line in lines if line["msg"].startswith("GenerateMux stream")]
    assert failed, lines
    assert all(line["request_id"] == "req-7f3a" and "secret" in line["exc"] for line in failed), failed


async def test_a_duplicate_open_leaves_the_open_stream_alone() -> None:
    async with running_worker(REAL_TIME) as w:
        call = w.stub.GenerateMux()  # type: ignore[call-arg]
        try:
            original = worker_pb2.GenerateMuxOpen(
                stream_id=1, request=generate_request("orig", range(20), 40)
            )
            await call.write(worker_pb2.GenerateMuxRequest(open=[original]))
            chunks: list[worker_pb2.GenerateMuxChunk] = []
            first = await call.read()
            assert isinstance(first, worker_pb2.GenerateMuxResponse)
            chunks.extend(first.chunks)
            duplicate = worker_pb2.GenerateMuxOpen(
                stream_id=1, request=generate_request("dup", range(20), 40)
            )
            await call.write(worker_pb2.GenerateMuxRequest(open=[duplicate]))
            while not chunks or not (chunks[-1].error_code or chunks[-1].response.finish_reason):
                message = await asyncio.wait_for(call.read(), 30)
                assert isinstance(message, worker_pb2.GenerateMuxResponse)
                chunks.extend(message.chunks)
            await call.done_writing()
            # Nothing else comes: the duplicate was never started.
            end = await asyncio.wait_for(call.read(), 30)
            assert not isinstance(end, worker_pb2.GenerateMuxResponse), end
        finally:
            call.cancel()
    assert {c.stream_id for c in chunks} == {1}
    assert not any(c.error_code for c in chunks), chunks[-1]
    assert chunks[-1].response.finish_reason == worker_pb2.FINISH_REASON_LENGTH
    assert [t for c in chunks for t in c.response.token_ids] == expected_tokens("orig", 20, 40)
