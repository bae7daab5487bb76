"""The planner's own metrics (``tokenyard_planner_*``): what it saw, predicted and decided per tick."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge

from tokenyard.planner.records import DecisionRecord, TrafficStats


class PlannerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"tokenyard_planner_{name}", doc, list(labels), registry=registry)

        self.observed = gauge(
            "observed_traffic", "Traffic over the last throughput interval, by quantity.", ("quantity",)
        )
        self.predicted = gauge(
            "predicted_traffic",
            "Predicted traffic for the next throughput interval, by quantity.",
            ("quantity",),
        )
        self.observed_latency = gauge(
            "observed_latency_ms", "Mean TTFT and ITL over the last interval, ms.", ("metric",)
        )
        self.target_latency = gauge("target_latency_ms", "The SLA targets, ms.", ("metric",))
        self.replicas = gauge(
            "replicas",
            "Replicas per pool: current (ready when the tick began), desired (this tick's decision) "
            "and throughput (what the throughput model asked for before floors and budget).",
            ("pool", "kind"),
        )
        self.estimated_latency = gauge(
            "estimated_latency_ms",
            "The model's TTFT or ITL per pool with the desired replicas (throughput tick) or now (load tick).",
            ("pool", "metric"),
        )
        self.load_decision = gauge(
            "load_scaling_decision", "The load loop's last step per pool: -1, 0 or +1.", ("pool",)
        )
        self.decision_id = gauge("decision_id", "Id of the latest decision record.")
        self.action_in_progress = gauge(
            "action_in_progress", "1 while a scaling action handed to the connector runs."
        )
        self.gpus = gauge("gpus", "GPUs the desired replicas use.")
        self.decisions = Counter(
            "tokenyard_planner_decisions_total",
            "Pool decisions, by pool, reason and state at the time they were made.",
            ["pool", "reason", "state"],
            registry=registry,
        )
        self.actions = Counter(
            "tokenyard_planner_actions_total",
            "Scaling actions handed to the connector, by connector and outcome (applied, failed).",
            ["connector", "outcome"],
            registry=registry,
        )

    def targets(self, ttft_ms: float, itl_ms: float) -> None:
        self.target_latency.labels("ttft").set(ttft_ms)
        self.target_latency.labels("itl").set(itl_ms)

    @staticmethod
    def _traffic(gauge: Gauge, stats: TrafficStats) -> None:
        for name, value in (
            ("request_rate", stats.request_rate),
            ("isl", stats.isl),
            ("osl", stats.osl),
            ("kv_hit_rate", stats.kv_hit_rate),
        ):
            if math.isfinite(value):
                gauge.labels(name).set(value)

    def record(self, record: DecisionRecord) -> None:
        self.decision_id.set(record.decision_id)
        self.gpus.set(record.gpus)
        if record.kind.value == "throughput":
            self._traffic(self.observed, record.observed)
            self._traffic(self.predicted, record.predicted)
            for name, value in (("ttft", record.observed_ttft_ms), ("itl", record.observed_itl_ms)):
                if math.isfinite(value):
                    self.observed_latency.labels(name).set(value)
        for p in record.pools:
            pool = p.pool.value
            self.replicas.labels(pool, "current").set(p.current)
            self.replicas.labels(pool, "desired").set(p.desired)
            if record.kind.value == "throughput":
                self.replicas.labels(pool, "throughput").set(p.throughput_replicas)
            else:
                self.load_decision.labels(pool).set((p.desired > p.current) - (p.desired < p.current))
            for name, value in (("ttft", p.ttft_ms), ("itl", p.itl_ms)):
                if math.isfinite(value):
                    self.estimated_latency.labels(pool, name).set(value)
            self.decisions.labels(pool, p.reason.value, p.state.value).inc()
