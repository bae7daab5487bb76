"""The dry run: the checked-in sample trace and profile make a readable PNG and a JSON report;
traces with gaps keep the last good decision and say why; bad traces are clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tokenyard.planner.config import PredictorKind
from tokenyard.planner.dry_run import DryRunSettings, main, policy_of, replay, write_report
from tokenyard.planner.perf import ProfilePerfModel
from tokenyard.planner.profile import load_profile
from tokenyard.planner.trace import TraceError, load_trace

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT / "bench" / "traces" / "planner_burst.jsonl"
PROFILE = ROOT / "bench" / "traces" / "planner_burst_profile.json"


def test_sample_trace_report_is_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    code = main(
        [
            "--trace",
            str(TRACE),
            "--profile",
            str(PROFILE),
            "--output",
            str(out),
            "--interval",
            "10",
            "--predictor",
            "kalman",
            "--sla-ttft-ms",
            "1000",
            "--sla-itl-ms",
            "200",
        ]
    )
    assert code == 0
    assert "report:" in capsys.readouterr().out
    from matplotlib.image import imread

    image = imread(out.with_suffix(".png"))
    assert image.shape[0] >= 800 and image.shape[1] >= 800  # four panels, legible
    assert image.std() > 0.05  # something was drawn
    doc = json.loads(out.with_suffix(".json").read_text())
    panels = doc["plot"]["panels"]
    assert [p["title"] for p in panels] == [
        "Load",
        "Replicas per pool",
        "Time to first token",
        "Inter-token latency",
    ]
    for panel, unit in zip(panels, ("(req/s)", "(workers)", "(ms)", "(ms)"), strict=True):
        assert unit in panel["ylabel"] and panel["legend"]
        assert panel["xlabel"] == "time (s)"
    assert "target 1000 ms" in panels[2]["legend"] and "target 200 ms" in panels[3]["legend"]
    # The burst (4x the quiet rate) is seen, met with more replicas, and released afterwards.
    replicas = [row["replicas"]["aggregated"] for row in doc["intervals"]]
    assert replicas[0] == 1 and max(replicas) >= 3 and replicas[-1] == 1
    assert len(doc["decisions"]) == len(doc["intervals"]) == doc["summary"]["intervals"]
    assert doc["summary"]["replica_seconds"] < 0.6 * doc["summary"]["replica_seconds_at_peak_count"]


def test_gaps_keep_the_last_good_decision(tmp_path: Path) -> None:
    trace = tmp_path / "gaps.csv"
    trace.write_text(
        "time_s,requests,isl,osl\n"
        "0,60,256,24\n"
        "60,240,256,24\n"
        "120,,256,24\n"  # a value missing
        "300,60,256,24\n"  # 180 and 240 missing
    )
    t = load_trace(trace)
    assert [i.start_s for i in t.intervals] == [0, 60, 120, 180, 240, 300]
    assert [bool(i.gap) for i in t.intervals] == [False, False, True, True, True, False]
    settings = DryRunSettings(trace=str(trace), profile=str(PROFILE), predictor=PredictorKind.CONSTANT)
    report = replay(t, ProfilePerfModel(load_profile(PROFILE)), policy_of(settings), "constant")
    before = report.records[1]
    for record in report.records[2:5]:
        assert record.pools[0].reason.value == "last_good"
        assert f"keeping decision {before.decision_id}" in record.summary
        assert record.desired() == before.desired()
    assert math.isnan(report.rows[3].observed_rate)
    png, js = write_report(report, tmp_path / "gaps")
    assert png.stat().st_size > 0 and json.loads(js.read_text())["summary"]["gaps"] == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ('{"timestamp": 0, "input_length": 10}\n', "output_length is missing"),
        ('{"timestamp": "soon", "input_length": 10, "output_length": 5}\n', "timestamp is not a number"),
        ("time_s,requests,isl,osl\n0,5,10,10\n0,5,10,10\n", "time_s must increase"),
        ("time_s,requests,isl,osl\n0,-5,10,10\n", "requests must be a finite number >= 0"),
        ("time_s,requests,isl,osl,kv_hit_rate\n0,5,10,10,3\n", "kv_hit_rate must be within 0..1"),
        ("{oops\n", "not JSON"),
    ],
)
def test_bad_traces(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["--trace", str(TRACE), "--profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not parse" in err and len(err.strip().splitlines()) == 1
