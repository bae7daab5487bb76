"""Summaries of a run: latency distributions, throughput, prompt cache hit rate, errors."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from bench.loadgen.client import RequestRecord


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Distribution:
    """In milliseconds for times; in their own unit for counts."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> Distribution | None:
        if not values:
            return None
        ms = sorted(v * scale for v in values)
        return cls(
            count=len(ms),
            mean=sum(ms) / len(ms),
            p50=percentile(ms, 50),
            p90=percentile(ms, 90),
            p99=percentile(ms, 99),
            min=ms[0],
            max=ms[-1],
        )


@dataclass(frozen=True)
class Summary:
    requests_sent: int
    requests_ok: int
    requests_failed: int
    errors: dict[str, int]
    error_samples: dict[str, str]
    duration_s: float
    request_throughput: float
    """Successful requests per second of the measured window."""
    output_token_throughput: float
    prompt_token_throughput: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int | None
    cache_hit_rate: float | None
    """sum(cached_tokens) / sum(prompt_tokens) over successful requests whose usage reports both;
    None when the server reports no cached tokens."""
    send_rate: float
    """Requests sent per second between the first and the last send: below the asked-for rate, the
    client (or a --max-concurrency cap) could not keep up."""
    mean_concurrency: float
    """Sum of latencies over the window: the concurrency the server actually saw."""
    usage_missing: int
    """Successful requests without a usage chunk: their output tokens were counted as chunks."""
    ttft_ms: Distribution | None
    itl_ms: Distribution | None
    tpot_ms: Distribution | None
    latency_ms: Distribution | None
    output_tokens_per_request: Distribution | None
    """Token counts, not milliseconds."""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def summarize(records: Sequence[RequestRecord], duration_s: float) -> Summary:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    errors = Counter(r.error for r in failed if r.error is not None)
    samples: dict[str, str] = {}
    for r in failed:
        if r.error is not None and r.error not in samples:
            samples[r.error] = r.error_detail or ""
    with_usage = [r for r in ok if r.prompt_tokens is not None]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in with_usage)
    cached = [r for r in with_usage if r.cached_tokens is not None]
    cached_tokens = sum(r.cached_tokens or 0 for r in cached) if cached else None
    cached_prompt = sum(r.prompt_tokens or 0 for r in cached)
    output_tokens = sum(r.output_tokens for r in ok)

    def rate(amount: float) -> float:
        return amount / duration_s if duration_s > 0 else 0.0

    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    return Summary(
        requests_sent=len(records),
        requests_ok=len(ok),
        requests_failed=len(failed),
        errors=dict(sorted(errors.items())),
        error_samples=samples,
        duration_s=duration_s,
        request_throughput=rate(len(ok)),
        output_token_throughput=rate(output_tokens),
        prompt_token_throughput=rate(prompt_tokens),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        cached_tokens=cached_tokens,
        cache_hit_rate=(cached_tokens / cached_prompt)
        if cached_tokens is not None and cached_prompt
        else None,
        send_rate=_send_rate(records),
        mean_concurrency=rate(sum(r.latency_s for r in records)),
        usage_missing=sum(1 for r in ok if r.completion_tokens is None),
        ttft_ms=Distribution.of([r.ttft_s for r in ok if r.ttft_s is not None], 1000.0),
        itl_ms=Distribution.of([gap for r in ok for gap in r.itl_s], 1000.0),
        tpot_ms=Distribution.of(tpots, 1000.0),
        latency_ms=Distribution.of([r.latency_s for r in ok], 1000.0),
        output_tokens_per_request=Distribution.of([r.output_tokens for r in ok]),
    )


def _send_rate(records: Sequence[RequestRecord]) -> float:
    if len(records) < 2:
        return 0.0
    starts = [r.start_s for r in records]
    span = max(starts) - min(starts)
    return (len(records) - 1) / span if span > 0 else 0.0
