"""GPU memory service settings (env prefix ``TOKENYARD_GMS_``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator

from tokenyard.common.settings import MetricsPortSettings, ServiceSettings, settings_config


def default_socket() -> str:
    return str(Path(tempfile.gettempdir()) / f"tokenyard-{os.getuid()}" / "gms-0.sock")


class GmsSettings(MetricsPortSettings, ServiceSettings):
    model_config = settings_config("gms")
    service_name: ClassVar[str] = "gms"

    socket: str = Field(
        default_factory=default_socket,
        description="Unix socket the gms serves gRPC on (one per device and tag).",
    )
    metrics_port: int = Field(
        default=8401, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint."
    )
    device: str = Field(
        default="cpu", description="Memory the service manages: cpu (shared memory) or cuda:N."
    )

    @field_validator("socket")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        if len(value.encode()) > 100:
            # sun_path holds 108 bytes; grpc needs a little of it.
            raise ValueError("unix socket paths longer than 100 bytes cannot be bound")
        return value
