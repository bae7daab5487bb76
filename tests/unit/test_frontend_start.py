"""``Frontend.start`` against a fake router (one layer: the pipeline before the worker call):
a request cut short while its Route call is out still tells the router it is over."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tokenyard.common.discovery import Instance, ModelCard, WatchEventKind
from tokenyard.common.errors import DeadlineExceeded
from tokenyard.frontend.core import Frontend
from tokenyard.frontend.generation import Endpoint, GenerationRequest, Outcome, RouteDecision
from tokenyard.frontend.limits import Limits
from tokenyard.frontend.metrics import FrontendMetrics
from tokenyard.frontend.models import ModelRegistry
from tokenyard.frontend.preprocess import Preprocessor
from tokenyard.frontend.tokenizer.byte_level import build_byte_tokenizer

pytestmark = pytest.mark.unit

MODEL = "m"


class HangingRouter:
    """Route never answers (a router that is slow to decide); notifications are recorded."""

    def __init__(self) -> None:
        self.routing = asyncio.Event()
        self.finished: list[tuple[str, Outcome]] = []

    async def route(self, *, request_id: str, **_: Any) -> RouteDecision:
        self.routing.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def notify_first_token(self, request_id: str) -> None:
        pass

    def notify_finished(self, request_id: str, outcome: Outcome, output_tokens: int) -> None:
        self.finished.append((request_id, outcome))


def _frontend(router: HangingRouter, limits: Limits) -> Frontend:
    models = ModelRegistry()
    card = ModelCard(MODEL, "bytes", 4, 4096, 100, "fake", "aggregated")
    models.apply(WatchEventKind.ADDED, Instance(7, "worker", "aggregated", "127.0.0.1:1", model_card=card))
    pre = Preprocessor(loader=lambda ref: build_byte_tokenizer())
    metrics = FrontendMetrics(CollectorRegistry())
    return Frontend(models, pre, router, None, metrics, limits=limits)  # type: ignore[arg-type]


def _request() -> GenerationRequest:
    return GenerationRequest(model=MODEL, endpoint=Endpoint.COMPLETIONS, stream=False, prompt="hello")


async def test_a_timeout_while_routing_tells_the_router_and_frees_the_slot() -> None:
    router = HangingRouter()
    frontend = _frontend(router, Limits(request_timeout=0.2, max_inflight_requests=1))
    with pytest.raises(DeadlineExceeded, match="--request-timeout"):
        await frontend.start(_request(), "r1")
    assert router.finished == [("r1", Outcome.FAILED)]
    assert frontend.admission.active == 0


async def test_a_client_that_leaves_while_routing_tells_the_router() -> None:
    router = HangingRouter()
    frontend = _frontend(router, Limits())
    task = asyncio.create_task(frontend.start(_request(), "r2"))
    await router.routing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert router.finished == [("r2", Outcome.CANCELLED)]
    assert frontend.admission.active == 0
