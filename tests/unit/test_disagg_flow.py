"""A split model's request in the frontend's pipeline (``Frontend.start`` → ``Generation``) against
a fake router and fake workers: which pools are routed, what each worker is asked, what the client
and the router see, and every way the prefill stage can end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from tokenyard.common import tracing
from tokenyard.common.discovery import Instance, ModelCard, WatchEventKind
from tokenyard.common.errors import DeadlineExceeded, Overloaded, Unavailable
from tokenyard.frontend.core import Frontend
from tokenyard.frontend.disagg import DisaggConfig, DisaggPolicy
from tokenyard.frontend.generation import (
    Endpoint,
    FinishReason,
    GenerationRequest,
    KvTransfer,
    Outcome,
    RouteDecision,
    StopConditions,
    TokenChunk,
    Usage,
    WorkerRequest,
)
from tokenyard.frontend.limits import Limits
from tokenyard.frontend.metrics import FrontendMetrics
from tokenyard.frontend.models import ModelRegistry
from tokenyard.frontend.preprocess import Preprocessor
from tokenyard.frontend.response_format import GuidedDecoding
from tokenyard.frontend.tokenizer.byte_level import build_byte_tokenizer

pytestmark = pytest.mark.unit

MODEL = "m"
PROMPT = "hello world"
TRANSFER = KvTransfer(20, 0, "p:1", "t-1", (11, 12), 11)
DECODE = RouteDecision(10, 0, "d:1", 0)
DECODE_2 = RouteDecision(11, 0, "d:2", 0)
PREFILL = RouteDecision(20, 0, "p:1", 0, max_num_batched_tokens=8192)


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


class FakeRouter:
    """Answers Route per pool (a decision, a list of them in turn, or an error to raise)."""

    def __init__(self, **pools: Any) -> None:
        self.pools = {("" if k == "default" else k): v for k, v in pools.items()}
        self.routes: list[dict[str, Any]] = []
        self.first_tokens: list[str] = []
        self.finished: list[tuple[str, Outcome]] = []

    async def route(self, **kwargs: Any) -> RouteDecision:
        self.routes.append(kwargs)
        answer = self.pools[kwargs.get("pool", "")]
        if isinstance(answer, list):
            answer = answer.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, RouteDecision)
        return answer

    def notify_first_token(self, request_id: str) -> None:
        self.first_tokens.append(request_id)

    def notify_finished(self, request_id: str, outcome: Outcome, output_tokens: int) -> None:
        self.finished.append((request_id, outcome))


class FakeWorkers:
    """Hands out the next stream queued for an address; records every request."""

    def __init__(self, **streams: list[FakeStream]) -> None:
        self.streams = {address.replace("_", ":"): list(s) for address, s in streams.items()}
        self.requests: list[tuple[str, WorkerRequest]] = []
        self.opened: list[FakeStream] = []
        self.called = asyncio.Event()

    def generate(self, address: str, request: WorkerRequest) -> FakeStream:
        self.requests.append((address, request))
        self.called.set()
        stream = self.streams[address].pop(0)
        self.opened.append(stream)
        return stream

    def to(self, address: str) -> list[WorkerRequest]:
        return [r for a, r in self.requests if a == address]


def _card(role: str) -> ModelCard:
    return ModelCard(MODEL, "bytes", 4, 4096, 1000, "fake", role, structured_output=("json_object",))


def _models(*workers: tuple[int, str, str]) -> ModelRegistry:
    models = ModelRegistry()
    for worker_id, role, address in workers:
        models.apply(
            WatchEventKind.ADDED, Instance(worker_id, "worker", role, address, model_card=_card(role))
        )
    return models


SPLIT = ((10, "decode", "d:1"), (11, "decode", "d:2"), (20, "prefill", "p:1"))


def _frontend(
    router: FakeRouter,
    workers: FakeWorkers,
    *,
    disagg: DisaggConfig | None = None,
    limits: Limits | None = None,
    models: ModelRegistry | None = None,
) -> tuple[Frontend, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = FrontendMetrics(registry)
    pre = Preprocessor(loader=lambda ref: build_byte_tokenizer())
    frontend = Frontend(
        models or _models(*SPLIT),
        pre,
        router,  # type: ignore[arg-type]
        workers,  # type: ignore[arg-type]
        metrics,
        limits=limits,
        disagg=disagg or DisaggConfig(policy=DisaggPolicy.ALWAYS),
    )
    return frontend, registry


def _request(max_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest(
        model=MODEL,
        endpoint=Endpoint.COMPLETIONS,
        stream=True,
        prompt=PROMPT,
        stop=StopConditions(max_tokens=max_tokens),
    )


def _prefilled(
    cached: int = 4,
    transfer: KvTransfer | None = TRANSFER,
    token: str = "a",
    finish: FinishReason = FinishReason.LENGTH,
) -> FakeStream:
    return FakeStream([TokenChunk([ord(token)], finish, Usage(len(PROMPT), 1, cached), transfer)])


def _decoded(text: str = "abc", cached: int = len(PROMPT), prompt: int = len(PROMPT)) -> FakeStream:
    """A decode worker's stream of ``text`` after a prompt of ``prompt`` tokens."""
    ids = [ord(c) for c in text]
    return FakeStream(
        [TokenChunk(ids[:1]), TokenChunk(ids[1:], FinishReason.LENGTH, Usage(prompt, len(ids), cached))]
    )


def _continued(text: str = "bc") -> FakeStream:
    """A decode worker continuing after the prefill's token "a" (its prompt is one longer)."""
    return _decoded(text, cached=len(PROMPT) + 1, prompt=len(PROMPT) + 1)


PROMPT_IDS = [ord(c) for c in PROMPT]


def _sample(metrics: CollectorRegistry, name: str, **labels: str) -> float:
    value = metrics.get_sample_value(name, {"model": MODEL, **labels})
    return 0.0 if value is None else float(value)


def _decisions(metrics: CollectorRegistry, decision: str, reason: str) -> float:
    return _sample(metrics, "tokenyard_frontend_disagg_decisions_total", decision=decision, reason=reason)


def _failures(metrics: CollectorRegistry, reason: str) -> float:
    return _sample(metrics, "tokenyard_frontend_disagg_prefill_failures_total", reason=reason)


async def _run(frontend: Frontend, request: GenerationRequest | None = None) -> tuple[str, Any]:
    generation = await frontend.start(request or _request(), "rid")
    async with generation:
        return await generation.collect()


async def test_a_split_request_prefills_remotely_then_decodes_as_one_stream() -> None:
    router = FakeRouter(decode=DECODE, prefill=PREFILL)
    workers = FakeWorkers(d_1=[_continued("bc")], p_1=[_prefilled(cached=4, token="a")])
    frontend, metrics = _frontend(router, workers)

    generation = await frontend.start(_request(), "rid")
    async with generation:
        deltas = [delta async for delta in generation]
    text, last = "".join(d.text for d in deltas), deltas[-1]

    # The prefill's token comes first, at once; the decode worker continues after it.
    assert [d.text for d in deltas] == ["a", "b", "c"]
    assert text == "abc"
    # Usage counts the client's prompt and all three tokens; the decode worker counts every
    # imported token as cached, the client hears the prefill worker's prefix-cache hits.
    assert last.usage == Usage(len(PROMPT), 3, 4)
    # The decode pool first, then the prefill pool under the prefill stage's own id.
    assert [(r["pool"], r["request_id"]) for r in router.routes] == [
        ("decode", "rid"),
        ("prefill", "rid:prefill"),
    ]
    (prefill,) = workers.to("p:1")
    assert prefill.prefill_only and prefill.kv_transfer is None
    assert prefill.stop.max_tokens == 1 and list(prefill.token_ids) == PROMPT_IDS
    (decode,) = workers.to("d:1")
    assert decode.kv_transfer == TRANSFER and not decode.prefill_only
    assert decode.stop.max_tokens == 2 and list(decode.token_ids) == [*PROMPT_IDS, ord("a")]
    # Each stage's end reaches the router exactly once; the decode stage's first token too.
    assert router.finished == [("rid:prefill", Outcome.FINISHED), ("rid", Outcome.FINISHED)]
    assert router.first_tokens == ["rid"]
    assert _decisions(metrics, "remote", "always") == 1
    assert _sample(metrics, "tokenyard_frontend_disagg_prefill_seconds_count") == 1


async def test_a_prompt_mostly_cached_on_the_decode_worker_skips_the_prefill_pool() -> None:
    cached = RouteDecision(10, 0, "d:1", len(PROMPT) - 1, overlap_blocks=2)
    router = FakeRouter(decode=cached, prefill=PREFILL)
    workers = FakeWorkers(d_1=[_decoded(cached=8)])
    frontend, metrics = _frontend(router, workers, disagg=DisaggConfig())

    text, last = await _run(frontend)

    assert text == "abc" and last.usage == Usage(len(PROMPT), 3, 8)
    assert [r["pool"] for r in router.routes] == ["decode"]
    (decode,) = workers.to("d:1")
    assert decode.kv_transfer is None and not decode.prefill_only
    assert router.finished == [("rid", Outcome.FINISHED)]
    assert _decisions(metrics, "local", "cached") == 1


async def test_a_busy_prefill_worker_sends_the_request_back_to_its_decode_worker() -> None:
    busy = RouteDecision(20, 0, "p:1", 0, active_prefill_tokens=9000, max_num_batched_tokens=8192)
    router = FakeRouter(decode=DECODE, prefill=busy)
    workers = FakeWorkers(d_1=[_decoded()])
    frontend, metrics = _frontend(router, workers, disagg=DisaggConfig())

    await _run(frontend)

    assert [r["pool"] for r in router.routes] == ["decode", "prefill"]
    assert workers.to("d:1")[0].kv_transfer is None
    # Routed only to learn its load: the router is told at once that it is over.
    assert router.finished == [("rid:prefill", Outcome.CANCELLED), ("rid", Outcome.FINISHED)]
    assert _decisions(metrics, "local", "prefill_busy") == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (Unavailable("no worker of model 'm' is in the prefill pool"), "no_prefill_worker"),
        (Overloaded("all 1 eligible workers of model 'm' are busy"), "prefill_busy"),
    ],
)
async def test_no_prefill_worker_to_route_to_means_a_local_prefill(error: Exception, reason: str) -> None:
    router = FakeRouter(decode=DECODE, prefill=error)
    workers = FakeWorkers(d_1=[_decoded()])
    frontend, metrics = _frontend(router, workers)

    text, _ = await _run(frontend)

    assert text == "abc"
    assert workers.to("d:1")[0].kv_transfer is None
    assert router.finished == [("rid", Outcome.FINISHED)]
    assert _decisions(metrics, "local", reason) == 1


async def test_a_prefill_worker_that_dies_before_the_handoff_leaves_the_prompt_to_the_decode_worker() -> None:
    dead = FakeStream([], Unavailable("Socket closed"))
    router = FakeRouter(decode=DECODE, prefill=PREFILL)
    workers = FakeWorkers(d_1=[_decoded()], p_1=[dead])
    frontend, metrics = _frontend(router, workers)

    text, last = await _run(frontend)

    assert text == "abc"
    # Computed by the decode worker: its own usage stands.
    assert last.usage == Usage(len(PROMPT), 3, len(PROMPT))
    assert workers.to("d:1")[0].kv_transfer is None
    assert dead.cancelled
    assert router.finished == [("rid:prefill", Outcome.FAILED), ("rid", Outcome.FINISHED)]
    assert _failures(metrics, "unavailable") == 1
    assert _sample(metrics, "tokenyard_frontend_disagg_prefill_seconds_count") == 0


PREFILL_2 = RouteDecision(21, 0, "p:2", 0, max_num_batched_tokens=8192)
TRANSFER_2 = KvTransfer(21, 0, "p:2", "t-2", (11, 12), 11)
TWO_PREFILL = (*SPLIT, (21, "prefill", "p:2"))


async def test_a_prefill_worker_that_dies_is_replaced_by_another_prefill_worker() -> None:
    dead = FakeStream([], Unavailable("Socket closed"))
    router = FakeRouter(decode=DECODE, prefill=[PREFILL, PREFILL_2])
    workers = FakeWorkers(d_1=[_continued()], p_1=[dead], p_2=[_prefilled(transfer=TRANSFER_2)])
    frontend, metrics = _frontend(router, workers, models=_models(*TWO_PREFILL))

    text, _ = await _run(frontend)

    assert text == "abc"
    # The decode worker imports the KV from the second prefill worker.
    assert workers.to("d:1")[0].kv_transfer == TRANSFER_2
    assert dead.cancelled
    prefill_routes = [r for r in router.routes if r.get("pool") == "prefill"]
    assert len(prefill_routes) == 2
    assert prefill_routes[1]["allowed_worker_ids"] == [21]
    assert router.finished == [
        ("rid:prefill", Outcome.FAILED),
        ("rid:prefill", Outcome.FINISHED),
        ("rid", Outcome.FINISHED),
    ]
    assert _failures(metrics, "unavailable") == 1
    assert _sample(metrics, "tokenyard_frontend_disagg_prefill_retries_total") == 1
    assert _sample(metrics, "tokenyard_frontend_disagg_prefill_seconds_count") == 1


async def test_a_retried_prefill_that_fails_again_leaves_the_prompt_to_the_decode_worker() -> None:
    router = FakeRouter(decode=DECODE, prefill=[PREFILL, PREFILL_2])
    dead_1 = FakeStream([], Unavailable("Socket closed"))
    dead_2 = FakeStream([], Unavailable("draining"))
    workers = FakeWorkers(d_1=[_decoded()], p_1=[dead_1], p_2=[dead_2])
    frontend, metrics = _frontend(router, workers, models=_models(*TWO_PREFILL))

    text, _ = await _run(frontend)

    assert text == "abc"
    assert workers.to("d:1")[0].kv_transfer is None
    # One retry: the second failure goes to the decode worker, not back to the first.
    assert len([r for r in router.routes if r.get("pool") == "prefill"]) == 2
    assert _failures(metrics, "unavailable") == 2
    assert _sample(metrics, "tokenyard_frontend_disagg_prefill_retries_total") == 1


async def test_a_prefill_that_times_out_is_not_retried() -> None:
    router = FakeRouter(decode=DECODE, prefill=[PREFILL, PREFILL_2])
    slow = FakeStream([], hang=True)
    workers = FakeWorkers(d_1=[_decoded()], p_1=[slow], p_2=[_prefilled(transfer=TRANSFER_2)])
    frontend, metrics = _frontend(
        router,
        workers,
        models=_models(*TWO_PREFILL),
        disagg=DisaggConfig(policy=DisaggPolicy.ALWAYS, prefill_timeout=0.05),
    )

    text, _ = await _run(frontend)

    assert text == "abc"
    assert len([r for r in router.routes if r.get("pool") == "prefill"]) == 1
    assert _failures(metrics, "timeout") == 1
    assert _sample(metrics, "tokenyard_frontend_disagg_prefill_retries_total") == 0


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (FakeStream([TokenChunk([7], FinishReason.LENGTH, Usage(11, 1, 0))]), "no_transfer"),
        (FakeStream([TokenChunk([7])]), "unavailable"),
        (FakeStream([TokenChunk([7], FinishReason.CANCELLED, Usage(11, 1, 0), TRANSFER)]), "no_transfer"),
    ],
)
async def test_a_prefill_without_a_handoff_falls_back(stream: FakeStream, reason: str) -> None:
    router = FakeRouter(decode=DECODE, prefill=PREFILL)
    workers = FakeWorkers(d_1=[_decoded()], p_1=[stream])
    frontend, metrics = _frontend(router, workers)

    assert (await _run(frontend))[0] == "abc"
    assert workers.to("d:1")[0].kv_transfer is None
    assert _failures(metrics, reason) == 1


async def test_a_prefill_that_takes_too_long_falls_back_and_is_cancelled() -> None:
    slow = FakeStream([], hang=True)
    router = FakeRouter(decode=DECODE, prefill=PREFILL)
    workers = FakeWorkers(d_1=[_decoded()], p_1=[slow])
    frontend, metrics = _frontend(
        router, workers, disagg=DisaggConfig(policy=DisaggPolicy.ALWAYS, prefill_timeout=0.05)
    )

    assert (await _run(frontend))[0] == "abc"
    assert slow.cancelled
    assert workers.to("p:1")[0].timeout == pytest.approx(0.05)
    assert router.finished == [("rid:prefill", Outcome.FAILED), ("rid", Outcome.FINISHED)]
    assert _failures(metrics, "timeout") == 1


async def test_the_request_deadline_running_out_during_prefill_fails_the_request() -> None:
    router = FakeRouter(decode=DECODE, prefill=PREFILL)
    workers = FakeWorkers(d_1=[_decoded()], p_1=[FakeStream([], hang=True)])
    frontend, metrics = _frontend(router, workers, limits=Limits(request_timeout=0.1))

    with pytest.raises(DeadlineExceeded, match="--request-timeout"):
        await _run(frontend)
    assert workers.to("d:1") == []
    assert router.finished == [("rid:prefill", Outcome.FAILED), ("rid", Outcome.FAILED)]
    # Not a fallback: the request itself ran out of time.
    assert _failures(metrics, "timeout") == 0


async def test_a_client_that_leaves_during_prefill_cancels_it() -> None:
    slow = FakeStream([], hang=True)
    router = FakeRouter(decode=DECODE, prefill=PREFILL)
    workers = FakeWorkers(d_1=[_decoded()], p_1=[slow])
    frontend, _ = _frontend(router, workers)
    generation = await frontend.start(_request(), "rid")

    async def consume() -> None:
        async with generation:
            await generation.collect()

    task = asyncio.create_task(consume())
    await workers.called.wait()
    assert workers.to("p:1")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slow.cancelled
    assert workers.to("d:1") == []
    assert sorted(router.finished) == [("rid", Outcome.CANCELLED), ("rid:prefill", Outcome.CANCELLED)]
    assert frontend.admission.active == 0


async def test_a_request_closed_before_it_was_read_ends_both_stages() -> None:
    router = FakeRouter(decode=DECODE, prefill=PREFILL)
    workers = FakeWorkers(d_1=[_continued()], p_1=[_prefilled()])
    frontend, _ = _frontend(router, workers)
    generation = await frontend.start(_request(), "rid")
    await generation.aclose()
    assert workers.requests == []
    assert sorted(router.finished) == [("rid", Outcome.CANCELLED), ("rid:prefill", Outcome.CANCELLED)]


def _lost(after: str = "") -> FakeStream:
    chunks = [TokenChunk([ord(c) for c in after])] if after else []
    return FakeStream(chunks, Unavailable("Socket closed"))


@pytest.mark.parametrize(("before", "passes_transfer"), [("", True), ("b", False)])
async def test_a_lost_decode_worker_migrates_within_the_decode_pool(
    before: str, passes_transfer: bool
) -> None:
    router = FakeRouter(decode=[DECODE, DECODE_2], prefill=PREFILL)
    # "a" comes from the prefill worker, ``before`` from the decode worker that is lost.
    rest = "abc"[1 + len(before) :]
    workers = FakeWorkers(d_1=[_lost(before)], d_2=[_decoded(rest)], p_1=[_prefilled(token="a")])
    frontend, _ = _frontend(router, workers)

    text, last = await _run(frontend)

    assert text == "abc" and last.usage is not None and last.usage.completion_tokens == 3
    moved = router.routes[-1]
    assert moved["pool"] == "decode" and moved["request_id"] == "rid"
    assert sorted(moved["allowed_worker_ids"]) == [11]
    (second,) = workers.to("d:2")
    # Before its decode worker's first token the prompt's KV is still where the prefill worker left it.
    assert second.kv_transfer == (TRANSFER if passes_transfer else None)
    assert list(second.token_ids) == [*PROMPT_IDS, *(ord(c) for c in "a" + before)]
    assert len(workers.to("p:1")) == 1
    assert router.finished[0] == ("rid:prefill", Outcome.FINISHED)
    assert router.finished[-1] == ("rid", Outcome.FINISHED)


async def test_prefill_workers_alone_or_without_decode_workers_do_not_split() -> None:
    only_aggregated_and_prefill = _models((1, "aggregated", "a:1"), (20, "prefill", "p:1"))
    router = FakeRouter(default=RouteDecision(1, 0, "a:1", 0))
    workers = FakeWorkers(a_1=[_decoded()])
    frontend, metrics = _frontend(router, workers, models=only_aggregated_and_prefill)

    assert (await _run(frontend))[0] == "abc"
    assert [r["pool"] for r in router.routes] == [""]
    assert workers.to("a:1")[0].kv_transfer is None
    assert _decisions(metrics, "remote", "always") == 0


async def test_policy_never_serves_a_split_model_from_its_decode_workers_alone() -> None:
    router = FakeRouter(default=DECODE)
    workers = FakeWorkers(d_1=[_decoded()])
    frontend, metrics = _frontend(router, workers, disagg=DisaggConfig(policy=DisaggPolicy.NEVER))

    assert (await _run(frontend))[0] == "abc"
    assert [r["pool"] for r in router.routes] == [""]
    assert _decisions(metrics, "local", "never") == 1


async def test_each_stage_has_its_span_in_the_request_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer(provider.get_tracer("test"))
    try:
        router = FakeRouter(decode=DECODE, prefill=PREFILL)
        workers = FakeWorkers(d_1=[_continued()], p_1=[_prefilled()])
        frontend, _ = _frontend(router, workers)
        await _run(frontend)
    finally:
        tracing.use_tracer(None)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"frontend.request", "tokenize", "route", "route_prefill", "prefill", "generate"}
    root = spans["frontend.request"]
    for name in ("route", "route_prefill", "prefill", "generate"):
        parent = spans[name].parent
        assert parent is not None and parent.span_id == root.context.span_id, name
    prefill, generate = spans["prefill"], spans["generate"]
    assert prefill.end_time is not None and generate.start_time is not None
    assert prefill.end_time <= generate.start_time
    assert prefill.attributes is not None and prefill.attributes["tokenyard.prefill_worker_id"] == 20


@pytest.mark.parametrize(
    ("max_tokens", "finish", "expected"),
    [(1, FinishReason.LENGTH, FinishReason.LENGTH), (5, FinishReason.STOP, FinishReason.STOP)],
)
async def test_a_request_its_first_token_completes_never_reaches_the_decode_worker(
    max_tokens: int, finish: FinishReason, expected: FinishReason
) -> None:
    router = FakeRouter(decode=DECODE, prefill=PREFILL)
    # Without a transfer: a request that ends here needs none.
    workers = FakeWorkers(d_1=[], p_1=[_prefilled(cached=4, token="z", finish=finish, transfer=None)])
    frontend, _ = _frontend(router, workers)

    text, last = await _run(frontend, _request(max_tokens))

    assert last.finish_reason is expected
    assert last.usage == Usage(len(PROMPT), 1, 4)
    assert text == "z"
    assert workers.to("d:1") == []
    assert router.finished == [("rid:prefill", Outcome.FINISHED), ("rid", Outcome.FINISHED)]


async def test_structured_output_drops_the_unconstrained_prefill_token() -> None:
    router = FakeRouter(decode=DECODE, prefill=PREFILL)
    workers = FakeWorkers(d_1=[_decoded("{}x")], p_1=[_prefilled(token="a")])
    frontend, _ = _frontend(router, workers)
    request = replace(_request(), guided=GuidedDecoding("json_object"))

    text, last = await _run(frontend, request)

    assert text == "{}x" and last.usage == Usage(len(PROMPT), 3, 4)
    (prefill,) = workers.to("p:1")
    assert prefill.guided is None
    (decode,) = workers.to("d:1")
    assert decode.kv_transfer == TRANSFER and list(decode.token_ids) == PROMPT_IDS
    assert decode.guided == GuidedDecoding("json_object") and decode.stop.max_tokens == 3


def test_a_model_splits_while_it_has_both_prefill_and_decode_workers() -> None:
    left: list[int] = []
    models = _models((20, "prefill", "p:1"))
    models.on_worker_left(lambda instance: left.append(instance.instance_id))
    # Prefill workers alone serve no client: the model is known, not servable.
    assert models.is_known(MODEL) and models.get(MODEL) is None
    served: Callable[[], Any] = lambda: models.get(MODEL)  # noqa: E731
    models.apply(WatchEventKind.ADDED, Instance(10, "worker", "decode", "d:1", model_card=_card("decode")))
    assert served().split and served().client_pool() == ("decode", [10])
    assert served().card.role == "decode"
    models.apply(
        WatchEventKind.ADDED, Instance(1, "worker", "aggregated", "a:1", model_card=_card("aggregated"))
    )
    # Aggregated workers are left out while the model is split.
    assert served().client_pool() == ("decode", [10])
    models.apply(
        WatchEventKind.REMOVED, Instance(20, "worker", "prefill", "p:1", model_card=_card("prefill"))
    )
    assert left == [20]
    assert not served().split and sorted(served().client_pool()[1]) == [1, 10]
