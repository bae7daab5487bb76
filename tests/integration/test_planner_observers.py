"""What the planner reads: a real mocker worker's per-step metrics (SubscribeForwardPassMetrics),
a frontend's /metrics page found through discovery, and ``tokenyard profile`` against a real worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from tests.fixtures.worker import eventually, generate_request, running_worker
from tokenyard.common.discovery import Instance, new_instance_id, open_discovery
from tokenyard.frontend.metrics import FrontendMetrics
from tokenyard.planner.clients import FrontendScraper, StepSubscriber, WorkerLimits
from tokenyard.planner.load import LoadModel, StepSample
from tokenyard.planner.observe import ObservationError
from tokenyard.planner.pools import Pool
from tokenyard.planner.profiler import ProfileSettings, sweep
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = pytest.mark.integration

FAST = MockerConfig(num_gpu_blocks=256, block_size=16, max_num_seqs=8, speedup_ratio=10.0)


async def test_step_metrics_feed_the_load_model() -> None:
    async with running_worker(FAST, load_interval=0.1) as w:
        model = LoadModel(Pool.AGGREGATED, min_observations=3)
        seen: list[StepSample] = []
        limits: list[WorkerLimits] = []
        left: list[int] = []

        def on_sample(pool: Pool, sample: StepSample) -> None:
            assert pool is Pool.AGGREGATED
            seen.append(sample)
            model.observe(sample)

        subscriber = StepSubscriber(
            w.discovery, on_sample, lambda p, i: left.append(i), lambda p, lim: limits.append(lim)
        )
        subscriber.start()
        try:
            await eventually(lambda: _true(bool(limits)), "the worker described itself")
            assert limits[0] == WorkerLimits(8, 8192, 256 * 16)
            await eventually(lambda: _true(any(s.wall_ms == 0 for s in seen)), "an idle heartbeat")
            # Distinct prompts (no prefix-cache hit), of lengths far apart, so the step times differ.
            for i, n in enumerate((32, 128, 512, 1024, 64, 256, 2048, 768)):
                prompt = [1000 * (i + 1) + t for t in range(n)]
                await w.generate(generate_request(f"r{i}", prompt, max_tokens=4))
            await eventually(lambda: _true(model.ready()), f"a fitted step model ({model.regression.reason})")
            worker_id = w.server.runtime.instance_id
            assert {s.worker_id for s in seen} == {worker_id}
            assert any(s.prefill_tokens > 0 for s in seen) and any(s.decode_requests > 0 for s in seen)
            assert model.regression.coef[0] >= 0
        finally:
            await subscriber.close()


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def frontend_page() -> AsyncIterator[tuple[FrontendMetrics, str]]:
    registry = CollectorRegistry()
    metrics = FrontendMetrics(registry)

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield metrics, f"127.0.0.1:{port}"
    await runner.cleanup()


async def test_frontends_are_found_in_discovery_and_scraped(
    frontend_page: tuple[FrontendMetrics, str],
) -> None:
    metrics, address = frontend_page
    discovery = open_discovery(f"memory://planner-scrape-{uuid.uuid4().hex}")
    scraper = FrontendScraper(discovery, timeout_s=2)
    try:
        with pytest.raises(ObservationError, match="no frontend is registered"):
            await scraper.observe()
        await discovery.register(
            Instance(new_instance_id(), "frontend", "", "127.0.0.1:1", metrics_address=address)
        )
        first = await scraper.observe()
        assert first.requests != first.requests  # NaN: the first scrape only sets the baseline
        series = metrics.model("m")
        for _ in range(4):
            metrics.count("m", "chat", True, "success")
            series.isl.observe(300)
            series.osl.observe(20)
            series.ttft.observe(0.25)
        await asyncio.sleep(0.05)
        obs = await scraper.observe()
        assert obs.requests == 4 and obs.isl == 300 and obs.osl == 20 and obs.ttft_ms == 250
        assert obs.interval_s > 0
    finally:
        await scraper.close()
        await discovery.close()


async def test_an_unreachable_frontend_is_an_observation_error() -> None:
    discovery = open_discovery("memory://unused")
    scraper = FrontendScraper(discovery, urls=["http://127.0.0.1:9/metrics"], timeout_s=1)
    try:
        with pytest.raises(ObservationError, match=r"cannot scrape http://127\.0\.0\.1:9/metrics"):
            await scraper.observe()
    finally:
        await scraper.close()
        await discovery.close()


@pytest.mark.timeout(240)
async def test_profile_a_worker() -> None:
    # Real time: sped up, the modelled gap between a 64- and a 1024-token prefill (about 14 ms) shrinks
    # below the noise of a loaded machine.
    async with running_worker(FAST.model_copy(update={"speedup_ratio": 1.0})) as w:
        settings = ProfileSettings(
            prefill_isl="64,256,1024", decode_context="128,512", decode_kv_points=3, decode_osl=8, repeats=1
        )
        profile = await sweep(settings, w.server.address, {})
    assert profile.prefill_isl.tolist() == [64, 256, 1024]
    assert profile.decode_context_length.tolist() == [128, 512]
    assert profile.decode_itl.shape == (len(profile.decode_active_kv_tokens), 2)
    assert (profile.max_kv_tokens, profile.max_num_seqs) == (4096, 8)
    assert profile.meta["engine"] == "mocker"
    # Longer prompts take longer (the mocker's model).
    assert profile.prefill_ttft_ms[-1] > profile.prefill_ttft_ms[0]
