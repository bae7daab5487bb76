"""Frontend settings (env prefix ``TOKENYARD_FRONTEND_``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from tokenyard.common.settings import ServiceSettings, settings_config
from tokenyard.frontend.disagg import DisaggConfig, DisaggPolicy


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
    migration_replacement_wait: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description=(
            "Seconds a migrating request waits for a worker to register when every worker of its "
            "model is lost (a standby taking over, a restart) before it fails; 0: do not wait."
        ),
    )

    # ---- disaggregated prefill and decode (models served by prefill and decode workers) ---------

    disagg_policy: DisaggPolicy = Field(
        default=DisaggPolicy.ISL_OR_LOAD,
        description=(
            "When a model has prefill and decode workers, which requests a prefill worker computes "
            "(the others are prefilled by their decode worker): always; never; isl_bounding (not "
            "those mostly cached on their decode worker: fewer than --disagg-isl-threshold uncached "
            "tokens and under --disagg-isl-ratio of the prompt); prefill_load (not while the prefill "
            "worker chosen is busy, see --disagg-prefill-busy-frac); isl_or_load (not in either case)."
        ),
    )
    disagg_isl_threshold: int = Field(
        default=2048,
        ge=0,
        description="isl_bounding: prefill locally only below this many prompt tokens not cached on the decode worker.",
    )
    disagg_isl_ratio: float = Field(
        default=0.7,
        ge=0,
        le=1,
        description="isl_bounding: prefill locally only when the uncached tokens are under this share of the prompt.",
    )
    disagg_prefill_busy_frac: float = Field(
        default=1.0,
        ge=0,
        description=(
            "prefill_load: the chosen prefill worker is busy when its queued prompt tokens exceed this "
            "many engine steps (fraction of its max_num_batched_tokens); its requests prefill locally."
        ),
    )
    disagg_decode_busy_frac: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "Decode guard: never prefill locally on a decode worker whose KV blocks in use, with the "
            "request's, would exceed this fraction of its pool; 0 turns the guard off."
        ),
    )
    disagg_prefill_timeout: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Seconds the prefill stage (prompt and KV hand-off) may take; after it, or when the prefill "
            "worker fails, the decode worker computes the prompt itself."
        ),
    )

    # ---- limits: each refusal is a clear 4xx / gRPC status naming the setting -------------------

    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest OpenAI HTTP request body accepted (413 above it); also the largest KServe message.",
    )
    max_prompt_tokens: int = Field(
        default=0,
        ge=0,
        description="Longest prompt accepted, in tokens (400 above it); 0 means the model's context length.",
    )
    max_output_tokens: int = Field(
        default=0,
        ge=0,
        description=(
            "Most output tokens a request may ask for (400 above it); requests that name no limit get "
            "this one. 0 means up to the model's context length."
        ),
    )
    max_inflight_requests: int = Field(
        default=0,
        ge=0,
        description=(
            "Requests served at once by this frontend, all surfaces together; more are refused as "
            "overloaded (the overload status / RESOURCE_EXHAUSTED). 0 means no limit."
        ),
    )
    max_streams_per_connection: int = Field(
        default=1024,
        ge=1,
        description=(
            "Concurrent requests on one client connection: HTTP/2 streams of a gRPC connection, and "
            "requests in flight on one ModelStreamInfer stream (more are answered with "
            "RESOURCE_EXHAUSTED in error_message). HTTP/1.1 serves one request per connection at a time."
        ),
    )
    request_timeout: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Seconds a request may take from arrival to its last token (504 / DEADLINE_EXCEEDED after "
            "it, and the worker stops generating); 0 means no limit. gRPC clients' own deadlines "
            "apply as well."
        ),
    )
    overload_status: int = Field(
        default=529,
        ge=400,
        le=599,
        description="HTTP status answered when every worker is busy (529, as the reference does; 503 and 429 are common too).",
    )

    def disagg(self) -> DisaggConfig:
        return DisaggConfig(
            policy=self.disagg_policy,
            isl_threshold=self.disagg_isl_threshold,
            isl_ratio=self.disagg_isl_ratio,
            prefill_busy_frac=self.disagg_prefill_busy_frac,
            decode_busy_frac=self.disagg_decode_busy_frac,
            prefill_timeout=self.disagg_prefill_timeout,
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
