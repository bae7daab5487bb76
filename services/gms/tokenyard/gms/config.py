"""Memory service settings (env prefix ``TOKENYARD_GMS_``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from tokenyard.common.gms.paths import FD_SOCKET_SUFFIX, default_socket
from tokenyard.common.gms.types import MemoryTag
from tokenyard.common.settings import MetricsPortSettings, ServiceSettings, settings_config

__all__ = ["GmsSettings", "default_socket"]

# sun_path holds 108 bytes; grpc needs a little of it, and the descriptor socket adds a suffix.
_MAX_SOCKET_BYTES = 100 - len(FD_SOCKET_SUFFIX)


class GmsSettings(MetricsPortSettings, ServiceSettings):
    model_config = settings_config("gms")
    service_name: ClassVar[str] = "gms"

    socket: str = Field(
        default_factory=default_socket,
        description="Unix socket the gms serves gRPC on; descriptors are passed on the same path plus "
        f"{FD_SOCKET_SUFFIX!r}.",
    )
    metrics_port: int = Field(
        default=8401, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint."
    )
    device: str = Field(
        default="cpu",
        description="Memory the service manages: cpu (shared memory). cuda:N needs the CUDA VMM backend, "
        "which this build does not have.",
    )
    tags: str = Field(
        default="weights",
        description="What the memory holds, comma-separated: weights, kv_cache. Each tag has its own lock "
        "and layout.",
    )
    alloc_retry_interval: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Seconds between attempts of an allocation that found no memory.",
    )
    alloc_retry_timeout: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="Seconds an allocation keeps retrying before RESOURCE_EXHAUSTED (0: one attempt).",
    )
    max_bytes: int = Field(
        default=0,
        ge=0,
        description="Most bytes allocated at once over every tag (0: no limit but the machine's memory).",
    )
    reserve: bool = Field(
        default=True,
        description="Commit the memory of each allocation when it is made, so that a shortage fails "
        "Allocate (and is retried) instead of killing a writer with SIGBUS later.",
    )

    @field_validator("socket")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        if len(value.encode()) > _MAX_SOCKET_BYTES:
            raise ValueError(f"unix socket paths longer than {_MAX_SOCKET_BYTES} bytes cannot be bound")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: str) -> str:
        names = [t.strip() for t in value.split(",") if t.strip()]
        known = [t.value for t in MemoryTag]
        unknown = [t for t in names if t not in known]
        if not names or unknown:
            raise ValueError(f"expected a comma-separated list of {', '.join(known)}")
        if len(set(names)) != len(names):
            raise ValueError("lists a tag twice")
        return ",".join(names)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda:"):
            raise ValueError("expected cpu or cuda:N")
        return value

    def tag_list(self) -> tuple[MemoryTag, ...]:
        return tuple(MemoryTag(t) for t in self.tags.split(","))
