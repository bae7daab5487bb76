"""bench/plots.py: every bench writes a PNG next to its JSON; the load generator's results too."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from bench import plots
from bench.loadgen.client import RequestRecord
from bench.loadgen.report import RunReport, write_results
from bench.loadgen.stats import summarize

pytestmark = pytest.mark.unit


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_png_goes_next_to_the_json(tmp_path: Path) -> None:
    assert plots.png_path(tmp_path / "results" / "x.json") == tmp_path / "results" / "x.png"


def test_bars_lines_and_percentiles_draw_one_picture(tmp_path: Path) -> None:
    chart = plots.Chart(
        [
            plots.Bars("A/B", "req/s", {"kv": {"throughput": 12.0}, "round-robin": {"throughput": 9.5}}),
            plots.percentile_bars(
                "TTFT", "ms", {"kv": {"p50": 10.0, "p90": 20.0, "p99": 30.0}, "round-robin": None}
            ),
            plots.Lines(
                "scaling",
                "tokens",
                "µs",
                {"ours": [(1024, 10.0), (2048, 19.0)], "naive": [(1024, 90.0), (2048, math.nan)]},
                logx=True,
                logy=True,
                styles={"naive": "--"},
            ),
            # Gaps (None, NaN) and log scales with missing values must not break drawing.
            plots.Bars("sparse", "s", {"a": {"x": None, "y": math.inf}, "b": {"x": 1.0}}, log=True),
        ],
        title="a bench",
        columns=2,
        notes=["measured on a test"],
    )
    path = plots.save(tmp_path / "bench.json", chart)
    assert path == tmp_path / "bench.png"
    width, height = png_size(path)
    assert width > 800 and height > 600, (width, height)


def test_nothing_to_draw_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to draw"):
        plots.save(tmp_path / "empty.json", plots.Chart([]))


def _record(i: int) -> RequestRecord:
    rec = RequestRecord(index=i, start_s=float(i), end_s=float(i) + 1.5)
    rec.ttft_s = 0.05 + i * 0.01
    rec.itl_s = [0.01, 0.012, 0.011]
    rec.content_chunks = 4
    rec.prompt_tokens = 100
    rec.completion_tokens = 4
    rec.cached_tokens = 50
    return rec


def test_loadgen_results_come_with_a_picture(tmp_path: Path) -> None:
    runs = [
        RunReport(label, {"concurrency": 4}, summarize([_record(i) for i in range(8)], 10.0), None, [])
        for label in ("baseline", "candidate")
    ]
    out = tmp_path / "results" / "run.json"
    write_results(out, "ab", ["--concurrency", "4"], runs, with_requests=False, created="now")
    assert json.loads(out.read_text())["comparison"]["baseline"] == "baseline"
    width, height = png_size(out.with_suffix(".png"))
    assert width > 1000 and height > 300


def test_loadgen_picture_survives_a_run_without_successes(tmp_path: Path) -> None:
    failed = RequestRecord(index=0, start_s=0.0, end_s=1.0, error="http_500")
    runs = [RunReport("only", {}, summarize([failed], 1.0), None, [])]
    out = tmp_path / "failed.json"
    write_results(out, "failed", [], runs, with_requests=False, created="now")
    png_size(out.with_suffix(".png"))
