"""Settings shared by every service.

Each service declares one ``pydantic-settings`` class that inherits :class:`ServiceSettings` and
sets its own env prefix (``TOKENYARD_<SERVICE>_``). The command-line flags are derived from the
same class by :mod:`tokenyard.common.cli_settings`, so a knob is declared exactly once.
"""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokenyard.common.discovery import default_discovery_dir

# Settings every service also reads from an unprefixed TOKENYARD_<NAME> variable.
SHARED_ENV = ("tls_ca", "tls_cert", "tls_key")


_TLS_HELP = {
    "ca": "CA certificate (PEM) of the deployment; with --tls-cert and --tls-key it turns on mTLS "
    "between services (`tokenyard certs` makes them).",
    "cert": "This process's certificate (PEM), signed by --tls-ca; it names the service it proves.",
    "key": "Private key (PEM) of --tls-cert.",
}


def tls_field(name: str) -> Any:
    """The ``tls_<name>`` field, declared once for the services and the tools that dial them."""
    return Field(default="", description=f"{_TLS_HELP[name]} Also read from TOKENYARD_TLS_{name.upper()}.")


def with_shared_env(data: Any, names: tuple[str, ...] = SHARED_ENV) -> Any:
    """Fill :data:`SHARED_ENV` settings from ``TOKENYARD_<NAME>`` when nothing more specific set them.

    One set of TOKENYARD_TLS_* variables then serves every process of a container or pod (and
    ``tokenyard probe``); a service's own variables and flags still win.
    """
    if isinstance(data, dict):
        for name in names:
            value = os.environ.get(f"TOKENYARD_{name.upper()}")
            if value and not data.get(name):
                data = {**data, name: value}
    return data


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


class TlsSettings(BaseSettings):
    """The mTLS files of a process that serves or dials services: the services themselves and the
    tools that call them (``tokenyard status``, ``probe``, ``profile``)."""

    tls_ca: str = tls_field("ca")
    tls_cert: str = tls_field("cert")
    tls_key: str = tls_field("key")

    @model_validator(mode="before")
    @classmethod
    def _shared_tls_env(cls, data: Any) -> Any:
        return with_shared_env(data)


class _ServiceBasics(BaseSettings):
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


class ServiceSettings(TlsSettings, _ServiceBasics):
    """Knobs every service has, its mTLS files last in ``--help`` (bases' fields come first in
    reverse order: the basics, then TLS)."""

    model_config = settings_config("service")


class MetricsPortSettings(BaseSettings):
    """For services that serve ``/metrics`` on a port of its own (all but the frontend)."""

    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (0 picks a free one).",
    )
