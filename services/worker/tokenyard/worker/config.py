"""Worker settings (env prefix ``TOKENYARD_WORKER_``)."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from tokenyard.common.settings import MetricsPortSettings, ServiceSettings, settings_config


class EngineKind(StrEnum):
    MOCKER = "mocker"
    CPU = "cpu"
    VLLM = "vllm"
    TRTLLM = "trtllm"


class WorkerRole(StrEnum):
    AGGREGATED = "aggregated"
    PREFILL = "prefill"
    DECODE = "decode"


class WorkerSettings(MetricsPortSettings, ServiceSettings):
    model_config = settings_config("worker")
    service_name: ClassVar[str] = "worker"

    port: int = Field(default=8300, ge=0, le=65535, description="gRPC port (worker, health, reflection).")
    metrics_port: int = Field(default=9300, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint.")
    engine: EngineKind = Field(default=EngineKind.MOCKER, description="Engine behind this worker.")
    role: WorkerRole = Field(default=WorkerRole.AGGREGATED, description="aggregated, prefill or decode.")
    model: str = Field(default="SmolLM2-135M-Instruct", min_length=1, description="Model name served to clients.")
    block_size: int = Field(default=64, ge=1, le=4096, description="Tokens per KV block (hashing and paging).")
    context_length: int = Field(default=8192, ge=16, description="Longest prompt plus output, in tokens.")
    total_kv_blocks: int = Field(default=16384, ge=1, description="KV blocks per data-parallel rank.")
