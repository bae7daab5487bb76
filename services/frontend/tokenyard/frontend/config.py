"""Frontend settings (env prefix ``TOKENYARD_FRONTEND_``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from tokenyard.common.settings import ServiceSettings, settings_config


class FrontendSettings(ServiceSettings):
    model_config = settings_config("frontend")
    service_name: ClassVar[str] = "frontend"

    port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="KServe v2 gRPC port (inference service, health, reflection).",
    )
    http_port: int = Field(
        default=8000, ge=0, le=65535, description="OpenAI HTTP port; also serves /health and /metrics."
    )
    router: str = Field(
        default="",
        description=(
            "Router addresses host:port, comma-separated (replicas, used in turn with failover); "
            "empty means every router found in discovery."
        ),
    )

    migration_limit: int = Field(
        default=3,
        ge=0,
        description=(
            "How many times a request whose worker died or whose stream broke is moved to another "
            "worker, continuing from the tokens generated so far; 0 disables migration."
        ),
    )

    def router_addresses(self) -> list[str]:
        return [a.strip() for a in self.router.split(",") if a.strip()]

    @model_validator(mode="after")
    def _distinct_ports(self) -> FrontendSettings:
        if self.port and self.port == self.http_port:
            raise ValueError(
                "--port (TOKENYARD_FRONTEND_PORT) and --http-port (TOKENYARD_FRONTEND_HTTP_PORT) must differ"
            )
        return self
