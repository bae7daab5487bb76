"""Frontend request metrics (``tokenyard_frontend_*``), on the process registry served at ``/metrics``.

Cost matters here: these are touched on every request, so label children are resolved once per
(model, endpoint) and cached, and inter-token latency is observed once per request (its mean)
rather than once per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenyard.common.errors import TokenyardError

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_SECONDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
_TOKENS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


_ERROR_TYPES = {
    grpc.StatusCode.INVALID_ARGUMENT: "validation",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overload",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.CANCELLED: "cancelled",
    grpc.StatusCode.DEADLINE_EXCEEDED: "response_timeout",
    grpc.StatusCode.UNIMPLEMENTED: "not_implemented",
}


def error_type(exc: BaseException) -> str:
    """The ``error_type`` label of a failed request."""
    if isinstance(exc, TokenyardError):
        return _ERROR_TYPES.get(exc.code, "internal")
    return "internal"


@dataclass(slots=True)
class _ModelSeries:
    inflight: Gauge
    ttft: Histogram
    itl: Histogram
    duration: Histogram
    isl: Histogram
    osl: Histogram
    cached: Histogram
    output_tokens: Counter


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tokenyard_frontend_requests_total",
            "Requests that ended, by model, endpoint, request type (stream or unary), status "
            "(success, error, cancelled) and error type.",
            ["model", "endpoint", "request_type", "status", "error_type"],
            registry=registry,
        )
        self._inflight = Gauge(
            "tokenyard_frontend_inflight_requests", "Requests being served now.", ["model"], registry=registry
        )
        self._ttft = Histogram(
            "tokenyard_frontend_time_to_first_token_seconds",
            "From request arrival to the first output token.",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self._itl = Histogram(
            "tokenyard_frontend_inter_token_latency_seconds",
            "Mean time between output tokens, one observation per request with two or more tokens.",
            ["model"],
            buckets=_ITL_SECONDS,
            registry=registry,
        )
        self._duration = Histogram(
            "tokenyard_frontend_request_duration_seconds",
            "From request arrival to its end.",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self._isl = Histogram(
            "tokenyard_frontend_input_sequence_tokens",
            "Prompt length in tokens.",
            ["model"],
            buckets=_TOKENS,
            registry=registry,
        )
        self._osl = Histogram(
            "tokenyard_frontend_output_sequence_tokens",
            "Output length in tokens.",
            ["model"],
            buckets=_TOKENS,
            registry=registry,
        )
        self._cached = Histogram(
            "tokenyard_frontend_cached_tokens",
            "Prompt tokens the worker found in its prefix cache.",
            ["model"],
            buckets=_TOKENS,
            registry=registry,
        )
        self._output_tokens = Counter(
            "tokenyard_frontend_output_tokens_total", "Output tokens generated.", ["model"], registry=registry
        )
        self.migrations = Counter(
            "tokenyard_frontend_migrations_total",
            "Requests moved to another worker after their worker died or their stream broke.",
            ["model"],
            registry=registry,
        )
        self._series: dict[str, _ModelSeries] = {}

    def model(self, model: str) -> _ModelSeries:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = _ModelSeries(
                self._inflight.labels(model),
                self._ttft.labels(model),
                self._itl.labels(model),
                self._duration.labels(model),
                self._isl.labels(model),
                self._osl.labels(model),
                self._cached.labels(model),
                self._output_tokens.labels(model),
            )
        return series

    def count(self, model: str, endpoint: str, stream: bool, status: str, error: str = "") -> None:
        self.requests.labels(model, endpoint, "stream" if stream else "unary", status, error).inc()
