"""Router settings (env prefix ``TOKENYARD_ROUTER_``)."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from tokenyard.common.settings import MetricsPortSettings, ServiceSettings, settings_config


class RouterMode(StrEnum):
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"


class RouterSettings(MetricsPortSettings, ServiceSettings):
    model_config = settings_config("router")
    service_name: ClassVar[str] = "router"

    port: int = Field(default=8100, ge=0, le=65535, description="gRPC port (router, health, reflection).")
    metrics_port: int = Field(
        default=8101, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint."
    )
    mode: RouterMode = Field(
        default=RouterMode.ROUND_ROBIN, description="How a worker is chosen for a request."
    )
    active_request_expiry: float = Field(
        default=300.0,
        gt=0,
        description="Seconds after which a routed request whose end was never notified is forgotten.",
    )
