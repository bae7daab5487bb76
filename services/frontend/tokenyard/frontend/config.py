"""Frontend settings (env prefix ``TOKENYARD_FRONTEND_``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from pydantic import Field, model_validator

from tokenyard.common.settings import ServiceSettings, settings_config, with_shared_env
from tokenyard.frontend.disagg import DisaggConfig, DisaggPolicy


class WorkerTransport(StrEnum):
    MUX = "mux"
    UNARY = "unary"


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

    # ---- client authentication (see the Security section of the README) ----------------------

    api_keys_file: str = Field(
        default="",
        description="File of API keys clients must send as 'Authorization: Bearer <key>' (one per line, "
        "# comments); with no key configured the frontend serves anyone.",
    )
    api_keys: str = Field(
        default="",
        description="API keys, comma-separated, added to --api-keys-file's (prefer the file or the "
        "environment: flags show in ps). Also read from TOKENYARD_API_KEYS.",
    )
    auth_probes: bool = Field(
        default=False,
        description="Also require an API key on /health, /live, /metrics and gRPC health (off: probes "
        "and Prometheus need none).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shared_api_keys_env(cls, data: Any) -> Any:
        return with_shared_env(data, ("api_keys",))

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
    http_reuse_port: bool = Field(
        default=False,
        description=(
            "Open the HTTP port with SO_REUSEPORT, so that several frontend processes (each with its "
            "own --port for KServe gRPC) serve one HTTP port and the kernel spreads connections over "
            "them: a box with cores to spare runs one per core."
        ),
    )
    worker_transport: WorkerTransport = Field(
        default=WorkerTransport.MUX,
        description=(
            "How requests reach workers: 'mux', all of this frontend's requests to a worker over one "
            "GenerateMux call (a step's tokens for all of them in one message); 'unary', a Generate "
            "call per request. Requests take Generate calls while tracing is on either way."
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
        default=600.0,
        ge=0,
        description=(
            "Seconds a request may take from arrival to its last token (504 / DEADLINE_EXCEEDED after "
            "it, and the worker stops generating); a deployment serving longer generations raises it, "
            "0 means no limit. gRPC clients' own deadlines apply as well."
        ),
    )
    default_max_tokens: int = Field(
        default=4096,
        ge=0,
        description=(
            "Output tokens a request that names no limit may generate (chat and responses; completions "
            "keep OpenAI's 16, KServe its 16), within what the context leaves after the prompt; a "
            "deployment may raise it. 0 means up to the model's context length."
        ),
    )

    # ---- client connections of the OpenAI HTTP server ------------------------------------------

    http_max_connections: int = Field(
        default=0,
        ge=0,
        description=(
            "Client connections the OpenAI HTTP server keeps open at once; one more is answered 503 "
            "and closed. 0: what the process's descriptor limit (raised to its hard limit) leaves "
            "after a reserve for the frontend's own connections."
        ),
    )
    http_header_timeout: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Seconds a request's line and headers may take from its first byte (408 and close after).",
    )
    http_body_timeout: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Seconds a request body may take to arrive once its headers did (408 after).",
    )
    http_idle_timeout: float = Field(
        default=75.0,
        gt=0,
        le=86400,
        description="Seconds a connection may stay open without a request in progress before it is closed.",
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
