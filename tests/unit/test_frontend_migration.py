"""Migration in the frontend's pipeline (:class:`tokenyard.frontend.core.Generation`), with fake
worker streams and a fake re-route: which failures move a request, what the continued request
asks for, and what the client and the router see."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from tokenyard.common.errors import Cancelled, InvalidArgument, TokenyardError, Unavailable
from tokenyard.frontend.core import Generation, TokenStream, worker_lost
from tokenyard.frontend.generation import (
    Endpoint,
    FinishReason,
    GenerationRequest,
    Outcome,
    StopConditions,
    TokenChunk,
    Usage,
)
from tokenyard.frontend.lifecycle import RequestLifecycle
from tokenyard.frontend.metrics import FrontendMetrics
from tokenyard.frontend.preprocess import Prepared
from tokenyard.frontend.tokenizer import DetokenizeStream
from tokenyard.frontend.tokenizer.byte_level import build_byte_tokenizer

pytestmark = pytest.mark.unit

PROMPT = [ord(c) for c in "hello"]


class FakeStream:
    """Sends ``chunks``, then raises ``error`` (or waits forever when ``hang``)."""

    def __init__(self, chunks: Sequence[TokenChunk], error: BaseException | None = None, hang: bool = False):
        self._chunks = list(chunks)
        self._error = error
        self._hang = hang
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> TokenChunk:
        await asyncio.sleep(0)
        if self._chunks:
            return self._chunks.pop(0)
        if self._hang:
            await asyncio.Event().wait()
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class Sink:
    def __init__(self) -> None:
        self.first_tokens = 0
        self.finished: list[tuple[Outcome, int]] = []

    def notify_first_token(self, request_id: str) -> None:
        self.first_tokens += 1

    def notify_finished(self, request_id: str, outcome: Outcome, output_tokens: int) -> None:
        self.finished.append((outcome, output_tokens))


class Rerouter:
    """Hands out the next stream on each re-route, from worker ids 2, 3, ..."""

    def __init__(self, *streams: FakeStream) -> None:
        self._streams = list(streams)
        self.calls: list[tuple[list[int], frozenset[int]]] = []

    async def __call__(self, generated: Sequence[int], avoid: frozenset[int]) -> tuple[int, TokenStream]:
        self.calls.append((list(generated), avoid))
        return len(self.calls) + 1, self._streams.pop(0)


def _tokens(text: str) -> list[int]:
    return [ord(c) for c in text]


def _generation(
    first: FakeStream,
    reroute: Rerouter,
    sink: Sink,
    metrics: FrontendMetrics,
    limit: int = 3,
    max_tokens: int = 6,
) -> Generation:
    request = GenerationRequest(
        model="m",
        endpoint=Endpoint.COMPLETIONS,
        stream=True,
        prompt="hello",
        stop=StopConditions(max_tokens=max_tokens),
    )
    return Generation(
        request,
        "rid",
        Prepared(PROMPT, "hello", []),
        first,
        RequestLifecycle(sink, "rid"),
        DetokenizeStream(build_byte_tokenizer()),
        metrics,
        0.0,
        worker_id=1,
        reroute=reroute,
        migration_limit=limit,
    )


def _migrations(metrics: FrontendMetrics) -> float:
    return sum(s.value for m in metrics.migrations.collect() for s in m.samples if s.name.endswith("_total"))


async def test_a_lost_worker_continues_elsewhere_as_one_stream() -> None:
    first = FakeStream([TokenChunk(_tokens("abc"))], Unavailable("Socket closed"))
    rest = FakeStream(
        [TokenChunk(_tokens("de")), TokenChunk(_tokens("f"), FinishReason.LENGTH, Usage(8, 3, 4))]
    )
    reroute, sink, metrics = Rerouter(rest), Sink(), FrontendMetrics(CollectorRegistry())
    text, last = await _generation(first, reroute, sink, metrics).collect()

    assert text == "abcdef"
    assert last.finish_reason is FinishReason.LENGTH
    # Usage counts the client's prompt and every generated token, not the continued request's.
    assert last.usage == Usage(len(PROMPT), 6, 4)
    assert reroute.calls == [(_tokens("abc"), frozenset({1}))]
    assert first.cancelled
    # The router tracks the re-routed request afresh: a first token per assignment, one end.
    assert sink.first_tokens == 2
    assert sink.finished == [(Outcome.FINISHED, 6)]
    assert _migrations(metrics) == 1


async def test_a_worker_lost_after_the_last_token_finishes_without_moving() -> None:
    first = FakeStream([TokenChunk(_tokens("abcdef"))], Unavailable("Socket closed"))
    reroute, sink, metrics = Rerouter(), Sink(), FrontendMetrics(CollectorRegistry())
    text, last = await _generation(first, reroute, sink, metrics).collect()
    assert (text, last.finish_reason, last.usage) == ("abcdef", FinishReason.LENGTH, Usage(len(PROMPT), 6))
    assert reroute.calls == []
    assert sink.finished == [(Outcome.FINISHED, 6)]


@pytest.mark.parametrize(
    "error", [Cancelled("cancelled"), InvalidArgument("bad"), TokenyardError("engine exploded")]
)
async def test_failures_that_are_not_a_lost_worker_are_not_migrated(error: TokenyardError) -> None:
    first = FakeStream([TokenChunk(_tokens("ab"))], error)
    reroute, sink, metrics = Rerouter(), Sink(), FrontendMetrics(CollectorRegistry())
    with pytest.raises(type(error)):
        await _generation(first, reroute, sink, metrics).collect()
    assert reroute.calls == []
    assert sink.finished == [(Outcome.FAILED, 2)]
    assert _migrations(metrics) == 0


async def test_a_client_that_goes_away_is_never_migrated() -> None:
    first = FakeStream([TokenChunk(_tokens("ab"))], hang=True)
    reroute, sink, metrics = Rerouter(), Sink(), FrontendMetrics(CollectorRegistry())
    generation = _generation(first, reroute, sink, metrics)
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in generation:
            got_one.set()

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await generation.aclose()
    assert reroute.calls == []
    assert first.cancelled
    assert sink.finished == [(Outcome.CANCELLED, 2)]
    assert _migrations(metrics) == 0


async def test_migration_stops_at_the_limit() -> None:
    def broken(text: str) -> FakeStream:
        return FakeStream([TokenChunk(_tokens(text))], Unavailable("Connection reset by peer"))

    reroute, sink, metrics = Rerouter(broken("b"), broken("c")), Sink(), FrontendMetrics(CollectorRegistry())
    with pytest.raises(Unavailable):
        await _generation(broken("a"), reroute, sink, metrics, limit=2).collect()
    assert [c[0] for c in reroute.calls] == [_tokens("a"), _tokens("ab")]
    assert reroute.calls[1][1] == frozenset({1, 2})
    assert sink.finished == [(Outcome.FAILED, 3)]
    assert _migrations(metrics) == 2


def test_which_failures_mean_a_lost_worker() -> None:
    assert worker_lost(Unavailable("Socket closed"))
    assert worker_lost(TokenyardError("Received RST_STREAM with error code 2"))
    assert worker_lost(TokenyardError("Stream removed"))
    assert not worker_lost(TokenyardError("the engine failed"))
    assert not worker_lost(Cancelled("Locally cancelled by application!"))
    assert not worker_lost(InvalidArgument("max_tokens must be positive"))
