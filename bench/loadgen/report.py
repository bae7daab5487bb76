"""Tables on stdout and the JSON results document."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import plots
from bench.loadgen.client import RequestRecord
from bench.loadgen.cpu import CpuReport
from bench.loadgen.stats import Distribution, Summary


@dataclass(frozen=True)
class RunReport:
    label: str
    config: dict[str, object]
    summary: Summary
    cpu: CpuReport | None
    records: Sequence[RequestRecord]

    @property
    def cpu_ms_per_request(self) -> float | None:
        if self.cpu is None or not self.summary.requests_ok:
            return None
        return self.cpu.seconds * 1000.0 / self.summary.requests_ok

    def to_json(self, with_requests: bool) -> dict[str, object]:
        doc: dict[str, object] = {
            "label": self.label,
            "config": self.config,
            "summary": self.summary.to_json(),
            "cpu": None
            if self.cpu is None
            else {**asdict(self.cpu), "ms_per_request": self.cpu_ms_per_request},
        }
        if with_requests:
            doc["requests"] = [r.to_json() for r in self.records]
        return doc


def _dist(d: Distribution | None, field: str) -> float | None:
    return None if d is None else float(getattr(d, field))


def headline(run: RunReport) -> dict[str, float | None]:
    """The metrics an A/B comparison puts side by side, in display order."""
    s = run.summary
    metrics: dict[str, float | None] = {
        "requests ok": float(s.requests_ok),
        "requests failed": float(s.requests_failed),
        "request throughput (req/s)": s.request_throughput,
        "output throughput (tok/s)": s.output_token_throughput,
        "prompt throughput (tok/s)": s.prompt_token_throughput,
        "cache hit rate (%)": None if s.cache_hit_rate is None else s.cache_hit_rate * 100.0,
        "send rate (req/s)": s.send_rate,
        "mean concurrency": s.mean_concurrency,
    }
    for name, dist in (
        ("TTFT", s.ttft_ms),
        ("ITL", s.itl_ms),
        ("TPOT", s.tpot_ms),
        ("latency", s.latency_ms),
    ):
        for field in ("mean", "p50", "p90", "p99"):
            metrics[f"{name} {field} (ms)"] = _dist(dist, field)
    metrics["CPU (s)"] = None if run.cpu is None else run.cpu.seconds
    metrics["CPU per request (ms)"] = run.cpu_ms_per_request
    return metrics


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0 or math.isnan(a) or math.isnan(b):
        return None
    return b / a


def comparison(runs: Sequence[RunReport]) -> dict[str, dict[str, float | None]]:
    """metric -> {label: value, ..., "<label>/<baseline>": ratio}; the first run is the baseline."""
    base = runs[0]
    base_metrics = headline(base)
    out: dict[str, dict[str, float | None]] = {name: {} for name in base_metrics}
    for run in runs:
        for name, value in headline(run).items():
            out[name][run.label] = value
    for run in runs[1:]:
        for name, value in headline(run).items():
            out[name][f"{run.label}/{base.label}"] = ratio(base_metrics[name], value)
    return out


def _num(value: float | None, width: int = 10) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if abs(value) >= 1000 or value == int(value):
        return f"{value:>{width}.0f}"
    return f"{value:>{width}.2f}"


def run_table(run: RunReport) -> str:
    s = run.summary
    lines = [f"== {run.label}: {run.config.get('target')} ({run.config.get('load')}) =="]
    lines.append(
        f"requests   {s.requests_ok} ok, {s.requests_failed} failed, {s.duration_s:.2f} s, "
        f"sent at {s.send_rate:.2f} req/s, mean concurrency {s.mean_concurrency:.1f}"
    )
    lines.append(
        f"throughput {s.request_throughput:.2f} req/s, {s.output_token_throughput:.1f} output tok/s, "
        f"{s.prompt_token_throughput:.1f} prompt tok/s"
    )
    if s.cache_hit_rate is not None:
        lines.append(
            f"cache hit  {s.cache_hit_rate * 100:.1f} % ({s.cached_tokens} cached of {s.prompt_tokens} prompt tokens)"
        )
    else:
        lines.append("cache hit  - (the server reported no cached_tokens)")
    if run.cpu is not None:
        per = run.cpu_ms_per_request
        lines.append(
            f"server CPU {run.cpu.seconds:.2f} s over {len(run.cpu.processes)} process(es)"
            + ("" if per is None else f", {per:.1f} ms per request")
        )
    if s.usage_missing:
        lines.append(f"usage      missing on {s.usage_missing} requests: output tokens counted as chunks")
    lines.append(f"{'':12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for name, d in (
        ("TTFT ms", s.ttft_ms),
        ("ITL ms", s.itl_ms),
        ("TPOT ms", s.tpot_ms),
        ("latency ms", s.latency_ms),
    ):
        if d is None:
            lines.append(f"{name:12}{'-':>10}")
        else:
            lines.append(
                f"{name:12}" + "".join(_num(getattr(d, f)) for f in ("mean", "p50", "p90", "p99", "max"))
            )
    for error, count in s.errors.items():
        lines.append(f"error      {error}: {count}  {s.error_samples.get(error, '')[:100]!r}")
    return "\n".join(lines)


def comparison_table(runs: Sequence[RunReport]) -> str:
    table = comparison(runs)
    base = runs[0].label
    cols = [r.label for r in runs] + [f"{r.label}/{base}" for r in runs[1:]]
    width = max(12, *(len(c) + 2 for c in cols))
    lines = [f"{'metric':30}" + "".join(f"{c:>{width}}" for c in cols)]
    for name, values in table.items():
        cells = []
        for c in cols:
            v = values.get(c)
            cells.append(
                f"{'-':>{width}}" if v is None else (f"{v:>{width}.3f}" if "/" in c else _num(v, width))
            )
        lines.append(f"{name:30}" + "".join(cells))
    return "\n".join(lines)


def write_results(
    path: Path, name: str, argv: Sequence[str], runs: Sequence[RunReport], with_requests: bool, created: str
) -> None:
    doc: dict[str, object] = {
        "name": name,
        "created": created,
        "argv": list(argv),
        "runs": [r.to_json(with_requests) for r in runs],
    }
    if len(runs) > 1:
        doc["comparison"] = {"baseline": runs[0].label, "metrics": comparison(runs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    plot_results(path, name, runs)


def plot_results(path: Path, name: str, runs: Sequence[RunReport]) -> Path:
    """The PNG next to the JSON: latency percentiles and throughput, one bar per run."""

    def dist(run: RunReport, field: str) -> dict[str, float] | None:
        d: Distribution | None = getattr(run.summary, field)
        return None if d is None else {"p50": d.p50, "p90": d.p90, "p99": d.p99}

    charts: list[plots.Bars | plots.Lines] = [
        plots.percentile_bars(title, "ms", {r.label: dist(r, field) for r in runs})
        for title, field in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("end-to-end latency", "latency_ms"))
    ]
    charts.append(
        plots.Bars(
            "request throughput", "req/s", {r.label: {"ok": r.summary.request_throughput} for r in runs}
        )
    )
    charts.append(
        plots.Bars(
            "output throughput",
            "tokens/s",
            {r.label: {"output": r.summary.output_token_throughput} for r in runs},
        )
    )
    if any(r.summary.cache_hit_rate is not None for r in runs):
        charts.append(
            plots.Bars(
                "prompt cache hit rate",
                "%",
                {
                    r.label: {
                        "hit rate": None
                        if r.summary.cache_hit_rate is None
                        else r.summary.cache_hit_rate * 100
                    }
                    for r in runs
                },
            )
        )
    return plots.save(path, plots.Chart(charts, title=f"loadgen: {name}"))
