"""Planner process wiring: connector, observers, the planner's loops, the gRPC service."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Callable
from pathlib import Path

from tokenyard.api.planner.v1 import planner_pb2_grpc
from tokenyard.common.discovery import Discovery
from tokenyard.common.service import ServiceRuntime, StartupError
from tokenyard.common.tls import Tls
from tokenyard.planner.budget import Budget
from tokenyard.planner.clients import FrontendScraper, StepSubscriber, WorkerLimits
from tokenyard.planner.config import ConnectorKind, PlannerSettings
from tokenyard.planner.connectors import Connector, ConnectorError, NoConnector
from tokenyard.planner.decide import Policy
from tokenyard.planner.extras import require_for
from tokenyard.planner.load import Limits
from tokenyard.planner.metrics import PlannerMetrics
from tokenyard.planner.perf import PerfModel, ProfilePerfModel
from tokenyard.planner.planner import Planner, PlannerConfig
from tokenyard.planner.pools import Pool
from tokenyard.planner.profile import ProfileError, load_profile
from tokenyard.planner.servicer import SERVICE_NAME, PlannerServicer
from tokenyard.planner.throughput import Targets


def policy_of(s: PlannerSettings) -> Policy:
    r, b = s.replicas, s.budget
    return Policy(
        mode=s.mode,
        targets=Targets(s.sla.ttft_ms, s.sla.itl_ms),
        minimums={Pool.AGGREGATED: r.min_aggregated, Pool.PREFILL: r.min_prefill, Pool.DECODE: r.min_decode},
        max_change=r.max_change,
        budget=Budget(
            b.max_gpus,
            b.min_gpus,
            {Pool.AGGREGATED: b.aggregated_gpus, Pool.PREFILL: b.prefill_gpus, Pool.DECODE: b.decode_gpus},
        ),
        queue_aware=s.throughput.queue_aware,
        throughput_enabled=s.throughput.enabled,
        load_enabled=s.load.enabled,
        load_sensitivity=s.load.sensitivity,
    )


def config_of(s: PlannerSettings, model: PerfModel | None) -> PlannerConfig:
    limits = Limits()
    max_num_seqs = 256
    if isinstance(model, ProfilePerfModel):
        limits = Limits(model.max_num_batched_tokens, model.max_kv_tokens)
        max_num_seqs = model.max_num_seqs
    return PlannerConfig(
        policy=policy_of(s),
        throughput_interval_s=s.throughput.interval,
        load_interval_s=s.load.interval,
        advisory=s.advisory,
        predictor=s.throughput.predictor.value,
        action_timeout_s=s.action_timeout,
        history=s.history,
        max_samples=s.load.max_samples,
        min_observations=s.load.min_observations,
        default_isl=s.throughput.default_isl,
        default_osl=s.throughput.default_osl,
        limits=limits,
        max_num_seqs=max_num_seqs,
    )


def connector_of(s: PlannerSettings, discovery: Discovery, address: Callable[[], str]) -> Connector:
    env = "TOKENYARD_PLANNER_CONNECTOR"
    try:
        if s.connector is ConnectorKind.LOCAL:
            from tokenyard.planner.connectors.local import LocalConnector, LocalOptions

            lo = s.local
            options = LocalOptions(
                engine=lo.engine,
                model=lo.model,
                host=s.host,
                discovery=s.discovery,
                state_dir=Path(lo.state_dir),
                log_level=s.log_level.value,
                extra_args=tuple(shlex.split(lo.worker_args)),
                first_port=lo.first_port,
                first_metrics_port=lo.first_metrics_port,
                max_workers=lo.max_workers,
                drain_grace_s=lo.drain_grace,
                ready_timeout_s=lo.ready_timeout,
                tls=Tls.from_paths(s.tls_ca, s.tls_cert, s.tls_key),
            )
            return LocalConnector(options, discovery)
        if s.connector is ConnectorKind.KUBERNETES:
            from tokenyard.planner.connectors.kubernetes import KubernetesConnector, KubernetesOptions

            k = s.kubernetes
            return KubernetesConnector(
                KubernetesOptions(
                    api_server=k.api_server,
                    namespace=k.namespace,
                    token_file=k.token_file,
                    ca_file=k.ca_file,
                    verify_tls=k.verify_tls,
                    deployments={
                        Pool.AGGREGATED: k.aggregated_deployment,
                        Pool.PREFILL: k.prefill_deployment,
                        Pool.DECODE: k.decode_deployment,
                    },
                    request_timeout_s=k.request_timeout,
                    conflict_retries=k.conflict_retries,
                    ready_timeout_s=k.ready_timeout,
                ),
                s.mode.pools,
            )
        if s.connector is ConnectorKind.VIRTUAL:
            from tokenyard.planner.connectors.virtual import VirtualConnector

            return VirtualConnector(
                discovery, address, poll_interval_s=s.virtual.poll_interval, max_wait_s=s.virtual.max_wait
            )
    except (ConnectorError, OSError) as exc:
        raise StartupError(f"the {s.connector.value} connector (--connector / {env}): {exc}") from None
    return NoConnector(discovery)


def perf_model_of(s: PlannerSettings) -> tuple[PerfModel | None, str]:
    if not s.profile:
        return None, ""
    try:
        return ProfilePerfModel(load_profile(s.profile)), ""
    except ProfileError as exc:
        raise StartupError(f"{exc} (--profile / TOKENYARD_PLANNER_PROFILE)") from None


async def serve(settings: PlannerSettings) -> None:
    require_for(settings.throughput.predictor, settings.connector)
    model, model_error = perf_model_of(settings)
    async with ServiceRuntime(settings, service="planner", metrics_port=settings.metrics_port) as runtime:
        metrics = PlannerMetrics(runtime.metrics.registry)
        urls = [u.strip() for u in settings.frontend_metrics.split(",") if u.strip()]
        scraper = FrontendScraper(runtime.discovery, urls=urls, model=settings.served_model)
        runtime.on_close(scraper.close)
        connector = connector_of(settings, runtime.discovery, lambda: runtime.address)
        if settings.connector is ConnectorKind.NONE and not settings.advisory:
            # Nothing could apply a decision: report them as advice rather than as failures.
            settings = settings.model_copy(update={"advisory": True})
        planner = Planner(
            config_of(settings, model),
            connector,
            scraper,
            perf_model=model,
            perf_model_error=model_error,
            metrics=metrics,
        )
        runtime.on_close(planner.close)
        runtime.add_servicer(
            planner_pb2_grpc.add_PlannerServiceServicer_to_server, PlannerServicer(planner), SERVICE_NAME
        )
        await runtime.start()

        def on_limits(pool: Pool, limits: WorkerLimits) -> None:
            planner.set_limits(pool, limits.max_num_seqs, limits.max_num_batched_tokens, limits.max_kv_tokens)

        steps = StepSubscriber(
            runtime.discovery, planner.observe_step, planner.forget_worker, on_limits, tls=runtime.tls
        )
        steps.start()
        runtime.on_close(steps.close)
        loop_task = asyncio.create_task(planner.run(), name="planner-loops")

        async def stop_loops() -> None:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task

        runtime.on_close(stop_loops)
        runtime.set_serving(True)
        await runtime.wait_for_shutdown()
