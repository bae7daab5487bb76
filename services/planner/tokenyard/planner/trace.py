"""Traffic traces for the dry run, as intervals of request count, mean ISL and mean OSL.

Two formats, told apart by their rows:

* **Mooncake** JSONL: one request per line, ``timestamp`` (ms), ``input_length``,
  ``output_length`` (and ``hash_ids``, unused here). Requests are binned into intervals of
  ``interval_s`` from the first timestamp; an interval without requests has zero traffic.
* **Intervals**, CSV with a header or JSONL: ``time_s`` (start of the interval, seconds),
  ``requests`` (count in the interval), ``isl`` and ``osl`` (means, tokens), optionally
  ``kv_hit_rate`` (0..1). The interval length is the step between rows. An empty or ``null``
  value, or a missing interval (``time_s`` jumping by more than one step), is a **gap**: the
  traffic there is unknown, and the dry run keeps the last good decision through it.

Rows that do not parse, negative values and timestamps that go backwards are errors that name
the file and line.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True)
class Interval:
    start_s: float
    requests: float
    isl: float
    osl: float
    kv_hit_rate: float = 0.0
    gap: str = ""
    """Why the traffic of this interval is unknown; empty when it is known."""


@dataclass(frozen=True)
class Trace:
    interval_s: float
    intervals: list[Interval]
    source: str
    kind: str


def _number(value: Any, where: str, name: str, *, allow_missing: bool = False) -> float:
    if value is None or value == "":
        if allow_missing:
            return math.nan
        raise TraceError(f"{where}: {name} is missing")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {name} is not a number: {value!r}") from None
    if math.isnan(number) and allow_missing:
        return math.nan
    if not math.isfinite(number) or number < 0:
        raise TraceError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return number


def load_trace(path: str | Path, interval_s: float = 60.0) -> Trace:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"trace {path}: {exc.strerror or exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise TraceError(f"trace {path}: empty")
    first = lines[0][1].lstrip()
    if first.startswith("{"):
        rows = []
        for n, line in lines:
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise TraceError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise TraceError(f"{path}:{n}: a row is a JSON object")
            rows.append((n, row))
        if "input_length" in rows[0][1]:
            return _mooncake(path, rows, interval_s)
        return _intervals(path, rows)
    reader = csv.DictReader(text.splitlines())
    rows = [(n + 1, dict(row)) for n, row in enumerate(reader, 1)]
    if not rows:
        raise TraceError(f"trace {path}: a CSV trace needs a header and rows")
    return _intervals(path, rows)


def _mooncake(path: Path, rows: list[tuple[int, dict[str, Any]]], interval_s: float) -> Trace:
    if interval_s <= 0:
        raise TraceError("the interval must be positive")
    requests: list[tuple[float, float, float]] = []
    for n, row in rows:
        where = f"{path}:{n}"
        ts = _number(row.get("timestamp"), where, "timestamp")
        isl = _number(row.get("input_length"), where, "input_length")
        osl = _number(row.get("output_length"), where, "output_length")
        requests.append((ts / 1000.0, isl, osl))
    requests.sort()
    t0 = requests[0][0]
    count = int((requests[-1][0] - t0) // interval_s) + 1
    bins: list[list[tuple[float, float]]] = [[] for _ in range(count)]
    for ts, isl, osl in requests:
        bins[int((ts - t0) // interval_s)].append((isl, osl))
    intervals = [
        Interval(
            start_s=i * interval_s,
            requests=float(len(b)),
            isl=sum(x for x, _ in b) / len(b) if b else math.nan,
            osl=sum(y for _, y in b) / len(b) if b else math.nan,
        )
        for i, b in enumerate(bins)
    ]
    return Trace(interval_s, intervals, str(path), "mooncake")


def _intervals(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> Trace:
    parsed: list[tuple[float, Interval]] = []
    for n, row in rows:
        where = f"{path}:{n}"
        if "time_s" not in row or "requests" not in row:
            raise TraceError(f"{where}: an interval row needs time_s and requests (and isl, osl)")
        start = _number(row.get("time_s"), where, "time_s")
        values = {
            name: _number(row.get(name), where, name, allow_missing=True)
            for name in ("requests", "isl", "osl", "kv_hit_rate")
        }
        if not math.isnan(values["kv_hit_rate"]) and values["kv_hit_rate"] > 1:
            raise TraceError(f"{where}: kv_hit_rate must be within 0..1")
        missing = [k for k in ("requests", "isl", "osl") if math.isnan(values[k])]
        if values["requests"] == 0:
            missing = [k for k in missing if k == "requests"]
        gap = f"no {', '.join(missing)} in the trace at {start:g}s" if missing else ""
        hit = 0.0 if math.isnan(values["kv_hit_rate"]) else values["kv_hit_rate"]
        parsed.append((start, Interval(start, values["requests"], values["isl"], values["osl"], hit, gap)))
    for (a, _), (b, _) in itertools.pairwise(parsed):
        if b <= a:
            raise TraceError(f"{path}: time_s must increase from row to row ({a:g} then {b:g})")
    steps = [b - a for (a, _), (b, _) in itertools.pairwise(parsed)]
    step = min(steps) if steps else 60.0
    intervals: list[Interval] = []
    for start, interval in parsed:
        if intervals:
            expected = intervals[-1].start_s + step
            while start - expected > step * 0.5:
                intervals.append(
                    Interval(expected, math.nan, math.nan, math.nan, gap=f"no row for {expected:g}s")
                )
                expected += step
        intervals.append(interval)
    return Trace(step, intervals, str(path), "intervals")
