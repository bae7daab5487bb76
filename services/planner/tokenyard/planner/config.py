"""Planner settings (env prefix ``TOKENYARD_PLANNER_``; groups nest with ``__``, e.g.
``TOKENYARD_PLANNER_SLA__TTFT_MS``)."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenyard.common.settings import MetricsPortSettings, ServiceSettings, settings_config
from tokenyard.planner.pools import Mode


class ConnectorKind(StrEnum):
    NONE = "none"
    LOCAL = "local"
    KUBERNETES = "kubernetes"
    VIRTUAL = "virtual"


class PredictorKind(StrEnum):
    CONSTANT = "constant"
    MOVING_AVERAGE = "moving_average"
    KALMAN = "kalman"
    ARIMA = "arima"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlaSettings(_Group):
    ttft_ms: float = Field(default=500.0, gt=0, description="Target mean time to first token, ms.")
    itl_ms: float = Field(default=50.0, gt=0, description="Target mean inter-token latency, ms.")


class ReplicaSettings(_Group):
    min_aggregated: int = Field(default=1, ge=0, le=1024, description="Fewest aggregated workers.")
    min_prefill: int = Field(default=1, ge=0, le=1024, description="Fewest prefill workers.")
    min_decode: int = Field(default=1, ge=0, le=1024, description="Fewest decode workers.")
    max_change: int = Field(
        default=8, ge=1, le=1024, description="Most replicas a pool gains or loses in one tick."
    )


class BudgetSettings(_Group):
    max_gpus: int = Field(
        default=8,
        ge=0,
        le=100_000,
        description="GPUs all pools may use together at most (hard cap); 0: none.",
    )
    min_gpus: int = Field(
        default=0, ge=0, le=100_000, description="GPUs the pools should use at least; 0: no floor."
    )
    aggregated_gpus: int = Field(default=1, ge=1, le=1024, description="GPUs per aggregated worker.")
    prefill_gpus: int = Field(default=1, ge=1, le=1024, description="GPUs per prefill worker.")
    decode_gpus: int = Field(default=1, ge=1, le=1024, description="GPUs per decode worker.")


class ThroughputSettings(_Group):
    enabled: bool = Field(default=True, description="Size the pools for the predicted traffic.")
    interval: float = Field(
        default=180.0, gt=0, le=86_400, description="Seconds between throughput ticks (and frontend scrapes)."
    )
    predictor: PredictorKind = Field(
        default=PredictorKind.ARIMA,
        description="Load predictor: constant, moving_average, kalman or arima (each constant until warm).",
    )
    queue_aware: bool = Field(
        default=True,
        description="Add replicas until the queueing estimates meet the targets, not only utilisation <= 1.",
    )
    default_isl: float = Field(
        default=3000.0, gt=0, description="Prompt length assumed before the frontends reported one, tokens."
    )
    default_osl: float = Field(
        default=150.0, gt=0, description="Output length assumed before the frontends reported one, tokens."
    )


class LoadSettings(_Group):
    enabled: bool = Field(
        default=True, description="React to per-step engine metrics between throughput ticks."
    )
    interval: float = Field(default=5.0, gt=0, le=3600, description="Seconds between load ticks.")
    sensitivity: float = Field(
        default=80.0,
        gt=0,
        le=100,
        description="Scale down only when one fewer worker would stay below this percentage of the targets.",
    )
    min_observations: int = Field(
        default=5, ge=2, le=10_000, description="Step samples a learned model needs before it decides."
    )
    max_samples: int = Field(default=64, ge=4, le=100_000, description="Step samples kept per pool.")


class LocalSettings(_Group):
    engine: str = Field(default="mocker", description="Engine of the workers the local connector starts.")
    model: str = Field(default="SmolLM2-135M-Instruct", description="Model those workers serve.")
    worker_args: str = Field(
        default="",
        description="More flags for those workers, shell-quoted (e.g. '--mocker-speedup-ratio 2').",
    )
    first_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="gRPC port of the first worker it starts (+1 each); 0: free ports.",
    )
    first_metrics_port: int = Field(
        default=0, ge=0, le=65535, description="/metrics port of the first worker it starts; 0: free ports."
    )
    max_workers: int = Field(default=16, ge=1, le=1024, description="Workers it runs at most.")
    state_dir: str = Field(
        default=".tokenyard/planner-workers", description="Folder for the logs and pid files of its workers."
    )
    drain_grace: float = Field(
        default=30.0, ge=0, le=3600, description="Seconds a stopping worker gets to finish its requests."
    )
    ready_timeout: float = Field(
        default=120.0, gt=0, le=3600, description="Seconds a new worker gets to be ready."
    )


class KubernetesSettings(_Group):
    api_server: str = Field(
        default="", description="API server URL; empty: in-cluster service account, else the kubeconfig."
    )
    namespace: str = Field(default="", description="Namespace of the Deployments; empty: the planner's own.")
    token_file: str = Field(default="", description="Bearer token file (with --kubernetes-api-server).")
    ca_file: str = Field(default="", description="CA bundle to verify the API server with.")
    verify_tls: bool = Field(default=True, description="Verify the API server's certificate.")
    aggregated_deployment: str = Field(
        default="tokenyard-worker", description="Deployment of the aggregated pool."
    )
    prefill_deployment: str = Field(
        default="tokenyard-worker-prefill", description="Deployment of the prefill pool."
    )
    decode_deployment: str = Field(
        default="tokenyard-worker-decode", description="Deployment of the decode pool."
    )
    request_timeout: float = Field(default=10.0, gt=0, le=600, description="Seconds per API request.")
    conflict_retries: int = Field(
        default=3, ge=0, le=100, description="Times a scale patch is retried after 409 Conflict."
    )
    ready_timeout: float = Field(
        default=600.0, gt=0, le=86_400, description="Seconds to wait for a Deployment's replicas to be ready."
    )


class VirtualSettings(_Group):
    poll_interval: float = Field(
        default=10.0, gt=0, le=3600, description="Seconds between checks for the agent's acknowledgement."
    )
    max_wait: float = Field(
        default=1800.0, gt=0, le=86_400, description="Seconds to wait for an acknowledgement before failing."
    )


class PlannerSettings(MetricsPortSettings, ServiceSettings):
    model_config = settings_config("planner")
    service_name: ClassVar[str] = "planner"

    port: int = Field(default=8200, ge=0, le=65535, description="gRPC port (planner, health, reflection).")
    metrics_port: int = Field(
        default=8201, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint."
    )
    mode: Mode = Field(
        default=Mode.AGGREGATED,
        description="Pools to scale: aggregated (one pool), disaggregated (prefill and decode), prefill, decode.",
    )
    connector: ConnectorKind = Field(
        default=ConnectorKind.NONE,
        description="Who applies decisions: none (report only), local (worker processes on this host), "
        "kubernetes (Deployments' scale), virtual (an outside agent through discovery).",
    )
    advisory: bool = Field(default=False, description="Compute and report decisions but never apply them.")
    profile: str = Field(
        default="",
        description="Worker profile from `tokenyard profile` (JSON or NPZ); empty: learn from step metrics.",
    )
    frontend_metrics: str = Field(
        default="",
        description="Comma-separated /metrics URLs of the frontends; empty: every frontend in discovery.",
    )
    served_model: str = Field(default="", description="Only count this model's requests; empty: all.")
    action_timeout: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="Seconds a scaling action may take before it counts as failed.",
    )
    history: int = Field(
        default=1000, ge=1, le=1_000_000, description="Decision records kept for ListDecisions."
    )
    sla: SlaSettings = Field(default_factory=SlaSettings, description="Latency targets.")
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings, description="Replica bounds.")
    budget: BudgetSettings = Field(default_factory=BudgetSettings, description="GPU budget.")
    throughput: ThroughputSettings = Field(
        default_factory=ThroughputSettings, description="Throughput-based (predictive) scaling."
    )
    load: LoadSettings = Field(default_factory=LoadSettings, description="Load-based (reactive) scaling.")
    local: LocalSettings = Field(default_factory=LocalSettings, description="The local connector.")
    kubernetes: KubernetesSettings = Field(
        default_factory=KubernetesSettings, description="The kubernetes connector."
    )
    virtual: VirtualSettings = Field(default_factory=VirtualSettings, description="The virtual connector.")

    @model_validator(mode="after")
    def _consistent(self) -> PlannerSettings:
        if not (self.throughput.enabled or self.load.enabled):
            raise ValueError(
                "--throughput-enabled and --load-enabled are both off "
                "(TOKENYARD_PLANNER_THROUGHPUT__ENABLED, TOKENYARD_PLANNER_LOAD__ENABLED): nothing would decide"
            )
        if self.budget.min_gpus and self.budget.max_gpus and self.budget.min_gpus > self.budget.max_gpus:
            raise ValueError(
                f"--budget-min-gpus ({self.budget.min_gpus}) exceeds --budget-max-gpus ({self.budget.max_gpus}) "
                "(TOKENYARD_PLANNER_BUDGET__MIN_GPUS, TOKENYARD_PLANNER_BUDGET__MAX_GPUS)"
            )
        return self
