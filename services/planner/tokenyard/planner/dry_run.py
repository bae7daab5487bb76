"""``tokenyard planner dry-run``: replay a trace through the predictors and the throughput
decisions, with no worker, and report what the planner would have done.

Each interval's traffic is observed at its end; the predictor's forecast and the decision made
then take effect for the next interval (replicas appear at once: the dry run judges the
decisions, not how fast a connector applies them). For every interval the report holds the
observed and predicted request rate, the replicas per pool in effect, and the TTFT and ITL the
performance model expects with those replicas at the traffic that actually came, against the
targets. A gap in the trace keeps the last good decision, and its record says so.

Writes ``OUTPUT.png`` (four panels: load, replicas, TTFT, ITL over time) and ``OUTPUT.json``
(the same series, one decision record per interval, a summary, and a description of the plot).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import BaseSettings

from tokenyard.common.cli_settings import parse_settings
from tokenyard.common.service import StartupError
from tokenyard.common.settings import settings_config
from tokenyard.planner.budget import Budget
from tokenyard.planner.config import BudgetSettings, PredictorKind, ReplicaSettings, SlaSettings
from tokenyard.planner.decide import Policy, hold, throughput_tick
from tokenyard.planner.extras import require, require_for
from tokenyard.planner.perf import PerfModel, ProfilePerfModel
from tokenyard.planner.pools import Mode, Pool
from tokenyard.planner.predictors import new_predictor
from tokenyard.planner.profile import ProfileError, load_profile
from tokenyard.planner.records import DecisionRecord, PoolDecision, Reason, TickKind, TrafficStats, _num
from tokenyard.planner.throughput import Demand, Latency, Targets, estimate
from tokenyard.planner.trace import Trace, TraceError, load_trace


class DryRunSettings(BaseSettings):
    model_config = settings_config("planner_dry_run")
    service_name: ClassVar[str] = "planner dry-run"

    trace: str = Field(description="Trace to replay: Mooncake JSONL, or intervals (CSV or JSONL).")
    profile: str = Field(description="Worker profile from `tokenyard profile` (JSON or NPZ).")
    output: str = Field(
        default="planner-dry-run",
        description="Report path without extension: writes OUTPUT.png and OUTPUT.json.",
    )
    interval: float = Field(
        default=60.0, gt=0, description="Seconds per interval when binning a Mooncake trace."
    )
    mode: Mode = Field(
        default=Mode.AGGREGATED, description="Pools: aggregated, disaggregated, prefill, decode."
    )
    predictor: PredictorKind = Field(default=PredictorKind.ARIMA, description="Load predictor.")
    queue_aware: bool = Field(
        default=True, description="Size for the queueing estimates, not only utilisation."
    )
    sla: SlaSettings = Field(default_factory=SlaSettings, description="Latency targets.")
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings, description="Replica bounds.")
    budget: BudgetSettings = Field(default_factory=BudgetSettings, description="GPU budget.")


def policy_of(s: DryRunSettings) -> Policy:
    r, b = s.replicas, s.budget
    return Policy(
        mode=s.mode,
        targets=Targets(s.sla.ttft_ms, s.sla.itl_ms),
        minimums={Pool.AGGREGATED: r.min_aggregated, Pool.PREFILL: r.min_prefill, Pool.DECODE: r.min_decode},
        max_change=r.max_change,
        budget=Budget(
            b.max_gpus,
            b.min_gpus,
            {Pool.AGGREGATED: b.aggregated_gpus, Pool.PREFILL: b.prefill_gpus, Pool.DECODE: b.decode_gpus},
        ),
        queue_aware=s.queue_aware,
        throughput_enabled=True,
        load_enabled=False,
    )


@dataclass
class Row:
    time_s: float
    observed_rate: float
    predicted_rate: float
    isl: float
    osl: float
    replicas: dict[Pool, int]
    ttft_ms: float
    itl_ms: float
    gap: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "observed_request_rate_per_s": _num(self.observed_rate),
            "predicted_request_rate_per_s": _num(self.predicted_rate),
            "avg_isl_tokens": _num(self.isl),
            "avg_osl_tokens": _num(self.osl),
            "replicas": {p.value: n for p, n in self.replicas.items()},
            "estimated_ttft_ms": _num(self.ttft_ms),
            "estimated_itl_ms": _num(self.itl_ms),
            "gap": self.gap,
        }


@dataclass
class Report:
    trace: Trace
    policy: Policy
    predictor: str
    rows: list[Row] = field(default_factory=list)
    records: list[DecisionRecord] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        known = [r for r in self.rows if not r.gap and r.observed_rate > 0]
        within = [r for r in known if Latency(r.ttft_ms, r.itl_ms).within(self.policy.targets)]
        step = self.trace.interval_s
        used = sum(sum(r.replicas.values()) for r in self.rows) * step
        peak = max((sum(r.replicas.values()) for r in self.rows), default=0)
        return {
            "intervals": len(self.rows),
            "gaps": sum(1 for r in self.rows if r.gap),
            "intervals_with_traffic_within_targets": len(within),
            "intervals_with_traffic": len(known),
            "replica_seconds": used,
            "replica_seconds_at_peak_count": peak * step * len(self.rows),
        }


def _latency(model: PerfModel, mode: Mode, demand: Demand, replicas: dict[Pool, int]) -> Latency:
    if mode is Mode.DISAGGREGATED:
        ttft = estimate(model, Pool.PREFILL, demand, replicas[Pool.PREFILL]).ttft_ms
        itl = estimate(model, Pool.DECODE, demand, replicas[Pool.DECODE]).itl_ms
        return Latency(ttft, itl)
    (pool,) = mode.pools
    return estimate(model, pool, demand, replicas[pool])


def replay(trace: Trace, model: PerfModel, policy: Policy, predictor: str) -> Report:
    report = Report(trace, policy, predictor)
    predictors = {name: new_predictor(predictor) for name in ("requests", "isl", "osl")}
    replicas = {pool: policy.minimum(pool) for pool in policy.mode.pools}
    predicted_rate = math.nan
    last_good: DecisionRecord | None = None
    step = trace.interval_s
    for i, interval in enumerate(trace.intervals):
        record = DecisionRecord(i + 1, int(interval.start_s * 1e9), TickKind.THROUGHPUT)
        rate = interval.requests / step if not interval.gap else math.nan
        if interval.gap:
            latency = Latency()
        else:
            isl = interval.isl if math.isfinite(interval.isl) else predictors["isl"].predict()
            osl = interval.osl if math.isfinite(interval.osl) else predictors["osl"].predict()
            if rate > 0 and math.isfinite(isl) and math.isfinite(osl):
                latency = _latency(model, policy.mode, Demand(rate, isl, osl, interval.kv_hit_rate), replicas)
            else:
                latency = Latency()
        report.rows.append(
            Row(
                interval.start_s,
                rate,
                predicted_rate,
                interval.isl,
                interval.osl,
                dict(replicas),
                latency.ttft_ms,
                latency.itl_ms,
                interval.gap,
            )
        )
        if interval.gap:
            why = f"gap in the trace ({interval.gap})"
            kept = last_good.desired() if last_good is not None else replicas
            note = f"{why}; keeping decision {last_good.decision_id}" if last_good else f"{why}; holding"
            record.pools = [
                PoolDecision(p, replicas[p], kept.get(p, replicas[p]), Reason.LAST_GOOD, detail=note)
                for p in policy.mode.pools
            ]
            record.summary = note
            predicted_rate = math.nan
        else:
            record.observed = TrafficStats(rate, interval.isl, interval.osl, interval.kv_hit_rate)
            predictors["requests"].add(interval.requests)
            predictors["isl"].add(interval.isl)
            predictors["osl"].add(interval.osl)
            count = predictors["requests"].predict()
            p_isl, p_osl = predictors["isl"].predict(), predictors["osl"].predict()
            predicted_rate = count / step if math.isfinite(count) else math.nan
            record.predicted = TrafficStats(predicted_rate, p_isl, p_osl, interval.kv_hit_rate)
            if all(math.isfinite(v) for v in (predicted_rate, p_isl, p_osl)):
                demand = Demand(predicted_rate, p_isl, p_osl, interval.kv_hit_rate)
                outcome = throughput_tick(policy, model, demand, replicas)
                record.pools, record.summary = outcome.decisions, outcome.summary
            else:
                record.pools = hold(policy, replicas, "no traffic observed yet")
                record.summary = "no traffic observed yet"
            last_good = record
        record.gpus = policy.budget.total(record.desired())
        report.records.append(record)
        replicas = record.desired()
    return report


# ---- the report files ----------------------------------------------------------------------------

POOL_COLORS = {Pool.AGGREGATED: "tab:blue", Pool.PREFILL: "tab:orange", Pool.DECODE: "tab:green"}


def plot(report: Report, path: Path) -> list[dict[str, Any]]:
    """Write the PNG; returns each panel's title, axis labels and legend entries."""
    from matplotlib.figure import Figure

    rows = report.rows
    t = [r.time_s for r in rows]
    targets = report.policy.targets
    fig = Figure(figsize=(11, 11), dpi=100, layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    load, reps, ttft, itl = axes
    load.plot(t, [r.observed_rate for r in rows], label="observed", color="black", drawstyle="steps-post")
    load.plot(
        t,
        [r.predicted_rate for r in rows],
        label=f"predicted ({report.predictor})",
        color="tab:red",
        linestyle="--",
        drawstyle="steps-post",
    )
    load.set_ylabel("request rate (req/s)")
    load.set_title("Load")
    for pool in report.policy.mode.pools:
        reps.plot(
            t,
            [r.replicas[pool] for r in rows],
            label=f"{pool.value} replicas",
            color=POOL_COLORS[pool],
            drawstyle="steps-post",
        )
    reps.set_ylabel("replicas (workers)")
    reps.set_title("Replicas per pool")
    ttft.plot(
        t, [r.ttft_ms for r in rows], label="estimated TTFT", color="tab:purple", drawstyle="steps-post"
    )
    ttft.axhline(targets.ttft_ms, color="tab:red", linestyle=":", label=f"target {targets.ttft_ms:g} ms")
    ttft.set_ylabel("time to first token (ms)")
    ttft.set_title("Time to first token")
    itl.plot(t, [r.itl_ms for r in rows], label="estimated ITL", color="tab:brown", drawstyle="steps-post")
    itl.axhline(targets.itl_ms, color="tab:red", linestyle=":", label=f"target {targets.itl_ms:g} ms")
    itl.set_ylabel("inter-token latency (ms)")
    itl.set_title("Inter-token latency")
    itl.set_xlabel("time (s)")
    gaps = [r.time_s for r in rows if r.gap]
    for ax in axes:
        for g in gaps:
            ax.axvspan(g, g + report.trace.interval_s, color="0.85", zorder=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    # Latencies past ten times the target would flatten the rest; an interval whose load exceeds
    # what the replicas can serve (the queue grows without bound) is marked at the top.
    for ax, target, values in (
        (ttft, targets.ttft_ms, [r.ttft_ms for r in rows]),
        (itl, targets.itl_ms, [r.itl_ms for r in rows]),
    ):
        finite = [v for v in values if math.isfinite(v)]
        top = max([target * 1.5, *[v for v in finite if v <= target * 10]]) * 1.1
        ax.set_ylim(0, top)
        over = [x for x, v in zip(t, values, strict=True) if math.isinf(v) or v > top]
        if over:
            ax.plot(over, [top * 0.97] * len(over), "v", color="tab:red", label="over capacity")
            ax.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"Planner dry run: {Path(report.trace.source).name} ({report.policy.mode.value})")
    fig.savefig(path, format="png")
    return [
        {
            "title": ax.get_title(),
            "xlabel": itl.get_xlabel(),
            "ylabel": ax.get_ylabel(),
            "legend": [text.get_text() for text in ax.get_legend().get_texts()],
        }
        for ax in axes
    ]


def write_report(report: Report, output: str | Path, *, profile: str = "") -> tuple[Path, Path]:
    base = Path(output)
    base.parent.mkdir(parents=True, exist_ok=True)
    png, js = base.with_suffix(".png"), base.with_suffix(".json")
    panels = plot(report, png)
    doc = {
        "trace": report.trace.source,
        "trace_kind": report.trace.kind,
        "interval_s": report.trace.interval_s,
        "profile": profile,
        "mode": report.policy.mode.value,
        "predictor": report.predictor,
        "targets": {"ttft_ms": report.policy.targets.ttft_ms, "itl_ms": report.policy.targets.itl_ms},
        "summary": report.summary(),
        "intervals": [r.to_json() for r in report.rows],
        "decisions": [r.to_json() for r in report.records],
        "plot": {"png": str(png), "panels": panels},
    }
    js.write_text(json.dumps(doc, indent=1) + "\n")
    return png, js


def main(argv: Sequence[str]) -> int:
    prog = "tokenyard planner dry-run"
    settings, _ = parse_settings(DryRunSettings, argv, prog, __doc__ or "")
    try:
        require("matplotlib", f"{prog} (its report's chart)")
        require_for(settings.predictor, predictor_flag="--predictor")
    except StartupError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        model = ProfilePerfModel(load_profile(settings.profile))
        trace = load_trace(settings.trace, settings.interval)
    except (ProfileError, TraceError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    report = replay(trace, model, policy_of(settings), settings.predictor.value)
    png, js = write_report(report, settings.output, profile=settings.profile)
    s = report.summary()
    print(
        f"{s['intervals']} intervals ({s['gaps']} gaps); within targets in "
        f"{s['intervals_with_traffic_within_targets']} of {s['intervals_with_traffic']} with traffic; "
        f"{s['replica_seconds']:.0f} replica-seconds (a fixed fleet at the peak count: "
        f"{s['replica_seconds_at_peak_count']:.0f})"
    )
    print(f"report: {png} {js}")
    return 0
