"""Frontend request metrics (``tokenyard_frontend_*``), on the process registry served at ``/metrics``.

Names follow the reference's frontend metrics (``dynamo_frontend_*``) with our prefix, so that
dashboards built for one read the other. Cost matters here: these are touched on every request,
so label children are resolved once per model and cached, and inter-token latency and
detokenization time are observed once per request (mean and total) rather than once per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenyard.common.errors import TokenyardError
from tokenyard.frontend.disagg import FAILURE_REASONS, LOCAL_REASONS, REMOTE_REASONS

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_SECONDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
_MILLISECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 1000)
_RATIO = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
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
class DisaggSeries:
    """One model's disaggregation metrics."""

    decisions: dict[tuple[bool, str], Counter]
    prefill_seconds: Histogram
    failures: dict[str, Counter]
    retries: Counter

    def decided(self, remote: bool, reason: str) -> None:
        self.decisions[(remote, reason)].inc()


@dataclass(slots=True)
class _ModelSeries:
    active: Gauge
    ttft: Histogram
    itl: Histogram
    duration: Histogram
    isl: Histogram
    osl: Histogram
    cached: Histogram
    hit_rate: Histogram
    output_tokens: Counter
    tokenize_ms: Histogram
    detokenize_ms: Histogram


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tokenyard_frontend_requests_total",
            "Requests that ended, by model, endpoint, request type (stream or unary), status "
            "(success, error, cancelled) and error type.",
            ["model", "endpoint", "request_type", "status", "error_type"],
            registry=registry,
        )
        self._active = Gauge(
            "tokenyard_frontend_active_requests",
            "Requests being served now (from the worker call opening to the last token).",
            ["model"],
            registry=registry,
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
        self._hit_rate = Histogram(
            "tokenyard_frontend_kv_hit_rate",
            "Share of a request's prompt tokens the worker found in its prefix cache.",
            ["model"],
            buckets=_RATIO,
            registry=registry,
        )
        self._tokenizer_ms = Histogram(
            "tokenyard_frontend_tokenizer_latency_ms",
            "Milliseconds spent tokenizing a request's prompt (chat template included) and "
            "detokenizing its output (the request's total).",
            ["model", "operation"],
            buckets=_MILLISECONDS,
            registry=registry,
        )
        self._output_tokens = Counter(
            "tokenyard_frontend_output_tokens_total", "Output tokens generated.", ["model"], registry=registry
        )
        self.migrations = Counter(
            "tokenyard_frontend_model_migration_total",
            "Requests moved to another worker after their worker died or their stream broke; "
            "migration_type is new_request (nothing streamed yet) or ongoing_request.",
            ["model", "migration_type"],
            registry=registry,
        )
        self.migration_limit = Gauge(
            "tokenyard_frontend_model_migration_limit",
            "How many times a request may be migrated.",
            registry=registry,
        )
        self.cancellations = Counter(
            "tokenyard_frontend_model_cancellation_total",
            "Requests the client abandoned (disconnect, gRPC cancel) before they finished.",
            ["model", "endpoint", "request_type"],
            registry=registry,
        )
        self.rejections = Counter(
            "tokenyard_frontend_model_rejection_total",
            "Requests refused before reaching a worker because of load: reason is overload (the "
            "router found every worker busy) or frontend_limit (--max-inflight-requests, "
            "--max-streams-per-connection).",
            ["model", "endpoint", "reason"],
            registry=registry,
        )
        self.disconnected = Gauge(
            "tokenyard_frontend_disconnected_clients",
            "Clients that went away before their request finished (since start).",
            registry=registry,
        )
        self._card = {
            name: Gauge(f"tokenyard_frontend_model_{name}", doc, ["model"], registry=registry)
            for name, doc in (
                ("total_kv_blocks", "KV cache blocks of one worker of the model (from its model card)."),
                ("context_length", "The model's context length in tokens (from its model card)."),
                ("kv_cache_block_size", "Tokens per KV cache block (from the model card)."),
            )
        }
        self._series: dict[str, _ModelSeries] = {}
        self._disagg_decisions = Counter(
            "tokenyard_frontend_disagg_decisions_total",
            "Requests of split models (prefill and decode workers), by where their prompt was "
            "computed: decision remote (a prefill worker) or local (their decode worker), and why "
            "(remote: always, uncached, prefill_free, decode_busy; local: never, cached, "
            "prefill_busy, no_prefill_worker).",
            ["model", "decision", "reason"],
            registry=registry,
        )
        self._disagg_prefill = Histogram(
            "tokenyard_frontend_disagg_prefill_seconds",
            "Prefill stage of remote requests: from opening the prefill worker's call to its KV "
            "hand-off (successful stages only).",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self._disagg_failures = Counter(
            "tokenyard_frontend_disagg_prefill_failures_total",
            "Prefill attempts that ended without a hand-off (reason: unavailable, timeout, error, "
            "no_transfer); another prefill worker (unavailable only, see _retries_total) or the "
            "decode worker then took the prompt.",
            ["model", "reason"],
            registry=registry,
        )
        self._disagg_retries = Counter(
            "tokenyard_frontend_disagg_prefill_retries_total",
            "Prefill stages tried again on another prefill worker after theirs went away.",
            ["model"],
            registry=registry,
        )
        self._disagg: dict[str, DisaggSeries] = {}

    def model(self, model: str) -> _ModelSeries:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = _ModelSeries(
                self._active.labels(model),
                self._ttft.labels(model),
                self._itl.labels(model),
                self._duration.labels(model),
                self._isl.labels(model),
                self._osl.labels(model),
                self._cached.labels(model),
                self._hit_rate.labels(model),
                self._output_tokens.labels(model),
                self._tokenizer_ms.labels(model, "tokenize"),
                self._tokenizer_ms.labels(model, "detokenize"),
            )
        return series

    def disagg(self, model: str) -> DisaggSeries:
        series = self._disagg.get(model)
        if series is None:
            decisions = {
                (remote, reason): self._disagg_decisions.labels(
                    model, "remote" if remote else "local", reason
                )
                for remote, reasons in ((True, REMOTE_REASONS), (False, LOCAL_REASONS))
                for reason in reasons
            }
            series = self._disagg[model] = DisaggSeries(
                decisions,
                self._disagg_prefill.labels(model),
                {reason: self._disagg_failures.labels(model, reason) for reason in FAILURE_REASONS},
                self._disagg_retries.labels(model),
            )
        return series

    def count(self, model: str, endpoint: str, stream: bool, status: str, error: str = "") -> None:
        self.requests.labels(model, endpoint, "stream" if stream else "unary", status, error).inc()

    def model_card(self, model: str, total_kv_blocks: int, context_length: int, block_size: int) -> None:
        self._card["total_kv_blocks"].labels(model).set(total_kv_blocks)
        self._card["context_length"].labels(model).set(context_length)
        self._card["kv_cache_block_size"].labels(model).set(block_size)
