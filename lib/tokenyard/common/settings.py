"""Settings shared by every service.

Each service declares one ``pydantic-settings`` class that inherits :class:`ServiceSettings` and
sets its own env prefix (``TOKENYARD_<SERVICE>_``). The command-line flags are derived from the
same class by :mod:`tokenyard.common.cli_settings`, so a knob is declared exactly once.
"""

from __future__ import annotations

import socket
from enum import StrEnum
from typing import ClassVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokenyard.common.discovery import default_discovery_dir


def default_discovery_url() -> str:
    return f"dir://{default_discovery_dir()}"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


def settings_config(service: str) -> SettingsConfigDict:
    """The pydantic-settings configuration every service uses, with its own env prefix."""
    return SettingsConfigDict(
        env_prefix=f"TOKENYARD_{service.upper()}_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )


class ServiceSettings(BaseSettings):
    """Knobs every service has: where it listens, how it is found, how it logs and stops."""

    model_config = settings_config("service")
    service_name: ClassVar[str] = "service"

    host: str = Field(
        default="127.0.0.1",
        description="Address the servers bind to; use 0.0.0.0 inside containers.",
    )
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    advertise_host: str = Field(
        default="",
        description="Host other services use to reach this one; empty means the bind host, or this "
        "machine's hostname when binding to all interfaces.",
    )
    discovery: str = Field(
        default_factory=default_discovery_url,
        description="Discovery backend: redis://host:port/db, dir:///path (one host, several processes) "
        "or memory:// (tests).",
    )
    discovery_ttl: float = Field(
        default=10.0,
        gt=0.5,
        le=3600,
        description="Lease TTL in seconds: a process that dies without deregistering disappears after it.",
    )
    grace_period: float = Field(
        default=5.0, ge=0, le=3600, description="Seconds in-flight RPCs get to finish on SIGTERM."
    )
    log_level: LogLevel = Field(default=LogLevel.INFO, description="Log level.")
    log_format: LogFormat = Field(default=LogFormat.TEXT, description="Log format: text or json lines.")

    @field_validator("host", "advertise_host")
    @classmethod
    def _no_spaces(cls, value: str) -> str:
        if any(c.isspace() for c in value):
            raise ValueError("must be a host name or address without spaces")
        return value

    def advertised_host(self) -> str:
        """The host name written into this instance's discovery record."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", ""):
            return socket.gethostname()
        return self.host


class MetricsPortSettings(BaseSettings):
    """For services that serve ``/metrics`` on a port of its own (all but the frontend)."""

    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (0 picks a free one).",
    )
