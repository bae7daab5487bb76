"""Reads what bench/clients/run_all.sh left in its output folder and prints one line per client run:
requests completed, errors, throughput and time to first token, as each tool measured them.

    python bench/clients/summarize.py bench/results/clients --expect 100

Writes ``summary.json`` beside the runs. The exit status is 1 when a run is missing, completed a
different number of requests than ``--expect``, or had errors; the numbers come from the tools'
own exports, so a run counts as failed even when the tool itself exited 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunSummary:
    name: str
    tool: str
    requests: int = 0
    errors: int = 0
    request_throughput: float | None = None  # requests/s
    output_token_throughput: float | None = None  # tokens/s, as the client counts tokens
    responses_per_request: float | None = None  # streamed responses (chunks) per request
    ttft_ms_avg: float | None = None
    ttft_ms_p50: float | None = None
    problems: list[str] = field(default_factory=list)

    def failed(self, expect: int | None) -> bool:
        if self.problems or self.errors:
            return True
        return expect is not None and self.requests != expect


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} under {folder}")
    return found[0]


def _metric(doc: dict[str, Any], name: str, stat: str = "avg") -> float | None:
    entry = doc.get(name)
    if isinstance(entry, dict) and isinstance(entry.get(stat), int | float):
        return float(entry[stat])
    return None


def _pa_requests(export: dict[str, Any]) -> list[dict[str, Any]]:
    """Every request of a perf_analyzer profile export (genai-perf writes the same format)."""
    return [r for experiment in export["experiments"] for r in experiment["requests"]]


def _ttft_ms(requests: list[dict[str, Any]]) -> list[float]:
    return [
        (r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in requests if r["response_timestamps"]
    ]


def _stream_ended(request: dict[str, Any], kind: str) -> bool:
    """Whether the request's last response closes it the way the protocol says."""
    outputs = request.get("response_outputs") or []
    if not outputs:
        return False
    last = outputs[-1]
    if kind == "kserve":
        return bool(last.get("finish_reason"))
    return "[DONE]" in str(last.get("response", ""))


def perf_analyzer(run: RunSummary, folder: Path) -> None:
    requests = _pa_requests(_load(_one(folder, "profile_export.json")))
    run.requests = len(requests)
    run.errors = sum(1 for r in requests if not r["response_timestamps"])
    ttft = _ttft_ms(requests)
    if ttft:
        run.ttft_ms_avg, run.ttft_ms_p50 = statistics.fmean(ttft), statistics.median(ttft)
    counts = [len(r["response_timestamps"]) for r in requests]
    run.responses_per_request = statistics.fmean(counts) if counts else None
    with _one(folder, "*.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows:
        run.request_throughput = float(rows[0]["Inferences/Second"])


def genai_perf(kind: str) -> Callable[[RunSummary, Path], None]:
    def parse(run: RunSummary, folder: Path) -> None:
        stats = _load(_one(folder, "*/profile_export_genai_perf.json"))
        requests = _pa_requests(_load(_one(folder, "*/profile_export.json")))
        run.requests = len(requests)
        run.errors = sum(1 for r in requests if not _stream_ended(r, kind))
        reported = _metric(stats, "request_count")
        if reported is not None and int(reported) != run.requests:
            run.problems.append(f"request_count {reported:.0f} but {run.requests} requests exported")
        run.request_throughput = _metric(stats, "request_throughput")
        run.output_token_throughput = _metric(stats, "output_token_throughput")
        run.ttft_ms_avg = _metric(stats, "time_to_first_token")
        run.ttft_ms_p50 = _metric(stats, "time_to_first_token", "p50")
        counts = [len(r["response_timestamps"]) for r in requests]
        run.responses_per_request = statistics.fmean(counts) if counts else None

    return parse


def aiperf(run: RunSummary, folder: Path) -> None:
    stats = _load(_one(folder, "profile_export_aiperf.json"))
    records = [
        json.loads(line)
        for line in _one(folder, "profile_export.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    run.requests = len(records)
    # The same failures, counted twice: per record and in the summary; either may be all there is.
    failed_records = sum(1 for r in records if r.get("error"))
    summarized = sum(int(e.get("count", 1)) for e in stats.get("error_summary") or [])
    run.errors = max(failed_records, summarized)
    completed = _metric(stats, "completed_request_count")
    if completed is not None and int(completed) != run.requests:
        run.problems.append(f"completed_request_count {completed:.0f} but {run.requests} records exported")
    if stats.get("was_cancelled"):
        run.problems.append("the run was cancelled")
    run.request_throughput = _metric(stats, "request_throughput")
    run.output_token_throughput = _metric(stats, "output_token_throughput")
    run.ttft_ms_avg = _metric(stats, "time_to_first_token")
    run.ttft_ms_p50 = _metric(stats, "time_to_first_token", "p50")
    chunks = _metric(stats, "http_req_chunks_received")
    run.responses_per_request = chunks


# Folder under the output folder -> (tool, parser); run_all.sh writes these folders.
RUNS: dict[str, tuple[str, Callable[[RunSummary, Path], None]]] = {
    "perf-analyzer-kserve-stream": ("perf_analyzer", perf_analyzer),
    "genai-perf-kserve-tensorrtllm": ("genai-perf", genai_perf("kserve")),
    "genai-perf-kserve-vllm": ("genai-perf", genai_perf("kserve")),
    "genai-perf-chat": ("genai-perf", genai_perf("chat")),
    "aiperf-chat-stream": ("aiperf", aiperf),
}


def summarize(out: Path, names: list[str] | None = None) -> list[RunSummary]:
    runs = []
    for name in names or list(RUNS):
        tool, parse = RUNS[name]
        run = RunSummary(name=name, tool=tool)
        try:
            parse(run, out / name)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            run.problems.append(f"{type(exc).__name__}: {exc}")
        runs.append(run)
    return runs


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(runs: list[RunSummary], expect: int | None) -> str:
    head = f"{'run':<31} {'requests':>8} {'errors':>6} {'req/s':>7} {'out tok/s':>9} {'resp/req':>8} "
    head += f"{'TTFT avg ms':>11} {'TTFT p50 ms':>11}  result"
    lines = [head]
    for r in runs:
        verdict = "FAILED" if r.failed(expect) else "ok"
        lines.append(
            f"{r.name:<31} {r.requests:>8} {r.errors:>6} {_fmt(r.request_throughput):>7} "
            f"{_fmt(r.output_token_throughput):>9} {_fmt(r.responses_per_request):>8} "
            f"{_fmt(r.ttft_ms_avg, 2):>11} {_fmt(r.ttft_ms_p50, 2):>11}  {verdict}"
        )
        lines.extend(f"    {p}" for p in r.problems)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the output folder of run_all.sh")
    parser.add_argument("--expect", type=int, help="requests each run must have completed")
    parser.add_argument("--runs", help="comma-separated runs to read (default: all)")
    args = parser.parse_args(argv)
    names = args.runs.split(",") if args.runs else None
    unknown = sorted(set(names or []) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {', '.join(unknown)}; known: {', '.join(RUNS)}")
    runs = summarize(args.out, names)
    print(table(runs, args.expect))
    (args.out / "summary.json").write_text(
        json.dumps({"expect": args.expect, "runs": [asdict(r) for r in runs]}, indent=2), encoding="utf-8"
    )
    return 1 if any(r.failed(args.expect) for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
