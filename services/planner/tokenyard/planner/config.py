"""Planner settings (env prefix ``TOKENYARD_PLANNER_``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from tokenyard.common.settings import MetricsPortSettings, ServiceSettings, settings_config


class PlannerSettings(MetricsPortSettings, ServiceSettings):
    model_config = settings_config("planner")
    service_name: ClassVar[str] = "planner"

    port: int = Field(default=8200, ge=0, le=65535, description="gRPC port (planner, health, reflection).")
    metrics_port: int = Field(
        default=8201, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint."
    )
    adjustment_interval: float = Field(
        default=180.0, gt=0, description="Seconds between two scaling decisions."
    )
