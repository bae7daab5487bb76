"""What the frontends report, turned into one interval's traffic and latency.

The frontends' Prometheus counters and histograms are cumulative; an observation is the
difference between two scrapes, summed over every frontend: request count (successful requests
that ended), mean ISL, OSL, TTFT, ITL and KV hit rate (histogram ``_sum / _count``). A frontend
that restarted (a counter went down) counts from zero; one that appeared counts from its first
scrape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "tokenyard_frontend_"
# Histogram base name -> what the observation calls it.
_HISTOGRAMS = {
    "input_sequence_tokens": "isl",
    "output_sequence_tokens": "osl",
    "time_to_first_token_seconds": "ttft",
    "inter_token_latency_seconds": "itl",
    "kv_hit_rate": "hit",
}


class ObservationError(Exception):
    """The frontends could not be read, or what they said makes no sense."""


@dataclass(frozen=True)
class Counters:
    """Cumulative totals of one frontend at one scrape."""

    requests: float = 0.0
    sums: tuple[tuple[str, float, float], ...] = ()
    """(name, sum, count) per histogram."""

    def get(self, name: str) -> tuple[float, float]:
        for key, total, count in self.sums:
            if key == name:
                return total, count
        return 0.0, 0.0


@dataclass(frozen=True)
class Observation:
    """One interval: ``requests`` ended successfully; means are NaN when nothing was measured."""

    interval_s: float
    requests: float
    isl: float = math.nan
    osl: float = math.nan
    kv_hit_rate: float = math.nan
    ttft_ms: float = math.nan
    itl_ms: float = math.nan

    @property
    def request_rate(self) -> float:
        return self.requests / self.interval_s if self.interval_s > 0 else math.nan


def parse_counters(text: str, model: str = "") -> Counters:
    """Totals from one ``/metrics`` page (of one model, or of all)."""
    requests = 0.0
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in _HISTOGRAMS.values()}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise ObservationError(f"not Prometheus text: {exc}") from None
    for family in families:
        if not family.name.startswith(PREFIX):
            continue
        base = family.name[len(PREFIX) :]
        for sample in family.samples:
            if model and sample.labels.get("model", model) != model:
                continue
            if base == "requests" and sample.name.endswith("_total"):
                if sample.labels.get("status") == "success":
                    requests += sample.value
            elif base in _HISTOGRAMS:
                slot = sums[_HISTOGRAMS[base]]
                if sample.name.endswith("_sum"):
                    slot[0] += sample.value
                elif sample.name.endswith("_count"):
                    slot[1] += sample.value
    return Counters(requests, tuple((k, v[0], v[1]) for k, v in sums.items()))


def difference(before: Counters | None, after: Counters) -> Counters:
    """What happened between two scrapes of one frontend (all of ``after`` after a restart)."""
    if before is None or after.requests < before.requests:
        return after
    sums = []
    for name, total, count in after.sums:
        t0, c0 = before.get(name)
        if count < c0:
            t0, c0 = 0.0, 0.0
        sums.append((name, total - t0, count - c0))
    return Counters(after.requests - before.requests, tuple(sums))


def observation(deltas: Iterable[Counters], interval_s: float) -> Observation:
    """Sum the per-frontend differences of one interval into an observation."""
    requests = 0.0
    totals: dict[str, list[float]] = {name: [0.0, 0.0] for name in _HISTOGRAMS.values()}
    for delta in deltas:
        requests += delta.requests
        for name, total, count in delta.sums:
            totals[name][0] += total
            totals[name][1] += count

    def mean(name: str, scale: float = 1.0) -> float:
        total, count = totals[name]
        return total / count * scale if count > 0 else math.nan

    obs = Observation(
        interval_s=interval_s,
        requests=requests,
        isl=mean("isl"),
        osl=mean("osl"),
        kv_hit_rate=mean("hit"),
        ttft_ms=mean("ttft", 1000.0),
        itl_ms=mean("itl", 1000.0),
    )
    _check(obs)
    return obs


def _check(obs: Observation) -> None:
    if obs.requests < 0 or not math.isfinite(obs.requests):
        raise ObservationError(f"the request count went backwards ({obs.requests})")
    for name in ("isl", "osl", "ttft_ms", "itl_ms"):
        value = getattr(obs, name)
        if not math.isnan(value) and (value < 0 or math.isinf(value)):
            raise ObservationError(f"mean {name} is {value}")
    if not math.isnan(obs.kv_hit_rate) and not 0 <= obs.kv_hit_rate <= 1.0 + 1e-9:
        raise ObservationError(f"mean KV hit rate is {obs.kv_hit_rate}, outside 0..1")


class FrontendCounters:
    """Keeps the previous scrape of each frontend and turns new scrapes into observations."""

    def __init__(self) -> None:
        self._previous: dict[str, Counters] = {}

    def update(self, scrapes: Mapping[str, Counters], interval_s: float) -> Observation:
        deltas = [difference(self._previous.get(key), counters) for key, counters in scrapes.items()]
        first = not self._previous
        self._previous = dict(scrapes)
        if first:
            # The first scrape holds everything since the frontends started, not one interval.
            return Observation(interval_s, math.nan)
        return observation(deltas, interval_s)
