"""Pictures of bench results: a PNG next to each JSON file, for people who look rather than read.

A bench describes what it measured as charts (:class:`Bars` for A/B comparisons and percentiles,
:class:`Lines` for a quantity against a size) and calls :func:`save` with the path of its JSON
file; the charts are laid out side by side in ``<name>.png``. Matplotlib draws on its Agg canvas
through :class:`~matplotlib.figure.Figure` directly, without pyplot's global state, so nothing
needs a display and a bench may draw from any thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PERCENTILES = ("p50", "p90", "p99")


@dataclass(frozen=True)
class Bars:
    """Grouped bars: for each group on the x axis, one bar per series (a configuration, a run)."""

    title: str
    ylabel: str
    # series label -> group label -> value; a missing or non-finite value leaves a gap.
    series: Mapping[str, Mapping[str, float | None]]
    log: bool = False


@dataclass(frozen=True)
class Lines:
    """One line per series: y against x."""

    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, Sequence[tuple[float, float]]]
    logx: bool = False
    logy: bool = False
    # series label -> matplotlib line style ("--" for a model or a baseline); default solid.
    styles: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Chart:
    """What :func:`save` lays out: charts in a row (wrapping after ``columns``)."""

    charts: Sequence[Bars | Lines]
    title: str = ""
    columns: int = 3
    notes: Sequence[str] = field(default_factory=tuple)


def png_path(json_path: Path) -> Path:
    """Where the picture of ``json_path`` goes: the same name, ``.png``."""
    return json_path.with_suffix(".png")


def percentile_bars(
    title: str, ylabel: str, runs: Mapping[str, Mapping[str, float] | None], keys: Sequence[str] = PERCENTILES
) -> Bars:
    """Bars of latency percentiles: one group per percentile, one bar per run.

    ``runs`` maps a run's label to a distribution with ``p50``, ``p90``, ``p99`` keys (the load
    generator's ``Distribution.to_json()``, or any mapping), or None when the run has none."""
    return Bars(
        title,
        ylabel,
        {label: {k: (dist or {}).get(k) for k in keys} for label, dist in runs.items()},
    )


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _draw_bars(ax: Axes, chart: Bars) -> None:
    groups: list[str] = []
    for values in chart.series.values():
        groups.extend(g for g in values if g not in groups)
    count = max(1, len(chart.series))
    width = 0.8 / count
    # Numbers on the bars help while they fit; past that they only clutter.
    labelled = count * len(groups) <= 16
    for i, (label, values) in enumerate(chart.series.items()):
        xs = [g + (i - (count - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get(group) for group in groups]
        kept = [(x, y) for x, y in zip(xs, ys, strict=True) if _finite(y)]
        if not kept:
            continue
        bars = ax.bar([x for x, _ in kept], [float(y) for _, y in kept if y is not None], width, label=label)
        if labelled:
            ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    long_labels = max(map(len, groups), default=0) > 8
    ax.set_xticks(
        range(len(groups)), groups, rotation=30 if long_labels else 0, ha="right" if long_labels else "center"
    )
    if chart.log:
        ax.set_yscale("log")
    ax.set_ylabel(chart.ylabel)
    ax.set_title(chart.title)
    ax.grid(axis="y", alpha=0.3)
    if len(chart.series) > 1:
        ax.legend(fontsize=8)


def _draw_lines(ax: Axes, chart: Lines) -> None:
    for label, points in chart.series.items():
        kept = sorted((x, y) for x, y in points if _finite(x) and _finite(y))
        if kept:
            ax.plot(
                [x for x, _ in kept],
                [y for _, y in kept],
                chart.styles.get(label, "-"),
                marker="o",
                markersize=3,
                label=label,
            )
    if chart.logx:
        ax.set_xscale("log")
    if chart.logy:
        ax.set_yscale("log")
    ax.set_xlabel(chart.xlabel)
    ax.set_ylabel(chart.ylabel)
    ax.set_title(chart.title)
    ax.grid(alpha=0.3)
    if chart.series:
        ax.legend(fontsize=8)


def save(json_path: Path, chart: Chart) -> Path:
    """Draw ``chart`` into the PNG next to ``json_path``; returns the PNG's path."""
    charts = list(chart.charts)
    if not charts:
        raise ValueError("nothing to draw")
    columns = max(1, min(chart.columns, len(charts)))
    rows = math.ceil(len(charts) / columns)
    figure = Figure(figsize=(5.2 * columns, 4.0 * rows + 0.3 * len(chart.notes)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(charts):
            ax.set_visible(False)
            continue
        item = charts[index]
        if isinstance(item, Bars):
            _draw_bars(ax, item)
        else:
            _draw_lines(ax, item)
    if chart.title:
        figure.suptitle(chart.title)
    if chart.notes:
        figure.supxlabel("\n".join(chart.notes), fontsize=8)
    path = png_path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
