"""KV-aware routing against the previous KV policy and round-robin, end to end: same
deployment, same workload, one run.

Each mode gets a fresh deployment (a router in that mode, four mocker workers with 256 KV blocks
each, a frontend), then the load generator sends 16 concurrent streams. Two workloads:

* ``--workload pressure`` (default), the cache-pressure workload: prompts made of one of 16
  shared 2000-token prefixes plus 100 tokens of their own, 50 output tokens each;
* ``--workload conversations``: the multi-turn conversation trace
  (bench/traces/conversations.jsonl, from ``python -m bench.traces.conversations``), replayed
  as a prompt source with each turn's session id as a routing hint.

Reports TTFT p50/p90 and the prompt cache hit rate the workers measured, per mode, and writes
JSON to bench/results/router_kv_vs_rr.json (``router_kv_vs_rr_<workload>.json`` for the others).

    .venv/bin/python -m bench.router_kv_vs_rr [--requests 400] [--rounds 1] [--modes kv,kv-classic,round-robin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import plots
from tokenyard.common.discovery import Instance, open_discovery

WORKERS = 4
KV_BLOCKS = 256
RESULTS = Path(__file__).parent / "results"
CONVERSATIONS = Path(__file__).parent / "traces" / "conversations.jsonl"
WORKLOADS: dict[str, list[str]] = {
    "pressure": ["--num-prefixes", "16", "--prefix-len", "2000", "--suffix-len", "100", "--output-len", "50"],
    # The trace's blocks are the mocker's (64 tokens); its turns carry their session ids.
    "conversations": ["--trace", str(CONVERSATIONS), "--block-size", "64", "--prompt-format", "tokens"],
}


async def _instances(url: str, service: str, count: int, timeout: float = 120) -> list[Instance]:
    discovery = open_discovery(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            found = await discovery.instances(service)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{count} {service}(s) did not register within {timeout}s")
    finally:
        await discovery.close()


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "tokenyard.cli", *argv], stdout=out, stderr=subprocess.STDOUT
    )


def _wait_http(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                if b'"id"' in resp.read():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the frontend never listed a model")


def run_mode(
    mode: str,
    requests: int,
    workdir: Path,
    router_flags: list[str],
    workload: str = "pressure",
    label: str | None = None,
) -> dict[str, Any]:
    workdir = workdir / str(abs(hash(label))) if label and label != mode else workdir
    url = f"dir://{workdir / mode / 'discovery'}"
    (workdir / mode).mkdir(parents=True)
    common = ["--port", "0", "--metrics-port", "0", "--discovery", url, "--log-level", "warning"]
    procs = [_start(["router", *common, "--mode", mode, *router_flags], workdir / mode / "router.log")]
    for i in range(WORKERS):
        procs.append(
            _start(
                ["worker", *common, "--mocker-num-gpu-blocks", str(KV_BLOCKS), "--mocker-speedup-ratio", "1"],
                workdir / mode / f"worker-{i}.log",
            )
        )
    try:
        asyncio.run(_instances(url, "worker", WORKERS))
        router = asyncio.run(_instances(url, "router", 1))[0]
        procs.append(
            _start(
                ["frontend", "--port", "0", "--http-port", "0", "--discovery", url, "--log-level", "warning"],
                workdir / mode / "frontend.log",
            )
        )
        frontend = asyncio.run(_instances(url, "frontend", 1))[0]
        port = int(frontend.metrics_address.rsplit(":", 1)[1])
        _wait_http(port)
        out = workdir / mode / "loadgen.json"
        subprocess.run(
            [
                sys.executable, "-m", "bench.loadgen",
                "--target", f"http://127.0.0.1:{port}",
                "--concurrency", "16",
                *WORKLOADS[workload],
                "--num-requests", str(requests), "--warmup", "32",
                "--progress", "off", "--output", str(out),
            ],
            check=True,
        )  # fmt: skip
        doc = dict(json.loads(out.read_text()))
        doc["router_metrics"] = _router_metrics(router.metrics_address)
        doc["frontend_metrics"] = _frontend_metrics(frontend.metrics_address)
        return doc
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def _router_metrics(address: str) -> dict[str, float]:
    """The router's own view: decisions, predicted hit rate, choices below the best overlap."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = {
        "tokenyard_router_kv_hit_rate_sum": "hit_rate_sum",
        "tokenyard_router_kv_hit_rate_count": "decisions",
        "tokenyard_router_non_max_overlap_selections_total": "non_max_overlap",
        "tokenyard_router_overlap_blocks_lost_sum": "overlap_blocks_lost",
        'tokenyard_router_overhead_seconds_sum{stage="total"}': "decision_seconds_sum",
        "tokenyard_router_time_to_first_token_seconds_sum": "ttft_seconds_sum",
        "tokenyard_router_time_to_first_token_seconds_count": "ttft_count",
    }
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    if out.get("decisions"):
        out["predicted_hit_rate"] = out.get("hit_rate_sum", 0.0) / out["decisions"]
        out["decision_ms_mean"] = 1000 * out.get("decision_seconds_sum", 0.0) / out["decisions"]
    if out.get("ttft_count"):
        out["ttft_ms_mean"] = 1000 * out.get("ttft_seconds_sum", 0.0) / out["ttft_count"]
    return out


def _frontend_metrics(address: str) -> dict[str, float]:
    """The frontend's own TTFT (from a request's arrival to its first token): the load generator's
    minus this is what the HTTP client and server add."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    sums = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        for kind in sums:
            if name.startswith(f"tokenyard_frontend_time_to_first_token_seconds_{kind}"):
                sums[kind] += float(value)
    return {"ttft_ms_mean": 1000 * sums["sum"] / sums["count"]} if sums["count"] else {}


def _summary(doc: dict[str, Any]) -> dict[str, float]:
    """TTFT p50/p90 (ms), cache hit rate and failures from a load generator result."""
    summary = doc["runs"][-1]["summary"]
    return {
        "ttft_p50_ms": float(summary["ttft_ms"]["p50"]),
        "ttft_p90_ms": float(summary["ttft_ms"]["p90"]),
        "cache_hit_rate": float(summary["cache_hit_rate"]),
        "requests_failed": float(summary["requests_failed"]),
        "ttft_mean_ms": float(summary["ttft_ms"]["mean"]),
        **{f"router_{k}": v for k, v in doc.get("router_metrics", {}).items()},
        **{f"frontend_{k}": v for k, v in doc.get("frontend_metrics", {}).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the modes this many times")
    parser.add_argument(
        "--modes",
        default="kv,kv-classic,round-robin",
        help="comma-separated router modes to run; 'kv[--decode-load-scale 1]' adds router flags to one",
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="pressure")
    parser.add_argument(
        "--kv-flags", default="", help="extra router flags for the kv run, e.g. '--eviction-weight 2'"
    )
    args = parser.parse_args()
    if args.workload == "conversations" and not CONVERSATIONS.exists():
        parser.error(f"{CONVERSATIONS} is missing: python -m bench.traces.conversations writes it")
    modes = args.modes.split(",")
    rows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        for r in range(args.rounds):
            for label in modes:
                # "kv[--eviction-weight 2]": a mode with router flags of its own.
                mode, _, extra = label.partition("[")
                flags = shlex.split(args.kv_flags) if mode == "kv" else []
                flags += shlex.split(extra.rstrip("]"))
                rows[label].append(
                    run_mode(mode, args.requests, Path(tmp) / f"round-{r}", flags, args.workload, label)
                )
    what = {
        "pressure": "16 prefixes x 2000 + 100 tokens, 50 out",
        "conversations": f"conversation trace {CONVERSATIONS.name}",
    }[args.workload]
    print(f"\n{WORKERS} mocker workers x {KV_BLOCKS} KV blocks, {what}, 16 streams")
    if args.kv_flags:
        print(f"kv router flags: {args.kv_flags}")
    print(
        f"{'mode':>12} {'TTFT p50 ms':>12} {'p90 ms':>8} {'cache hit':>10} {'failed':>7}   (medians over rounds)"
    )
    summary: dict[str, dict[str, Any]] = {}
    for mode, docs in rows.items():
        s = [_summary(d) for d in docs]
        ttft = statistics.median(x["ttft_p50_ms"] for x in s)
        p90 = statistics.median(x["ttft_p90_ms"] for x in s)
        hit = statistics.median(x["cache_hit_rate"] for x in s)
        failed = sum(x["requests_failed"] for x in s)
        summary[mode] = {
            "ttft_p50_ms": ttft,
            "ttft_p90_ms": p90,
            "cache_hit_rate": hit,
            "rounds": s,
            "kv_flags": args.kv_flags if mode == "kv" else "",
        }
        rounds = ", ".join(f"{x['ttft_p50_ms']:.1f} ms / {x['cache_hit_rate']:.2f}" for x in s)
        print(f"{mode:>12} {ttft:>12.1f} {p90:>8.1f} {hit:>10.2f} {failed:>7.0f}   rounds: {rounds}")
    print(
        f"\n{'mode':>12} {'TTFT mean ms':>13} {'at the frontend':>16} {'after routing':>14} {'routing decision':>17}"
        "   (last round; the services' means include the warm-up)"
    )
    for mode, docs in rows.items():
        x = _summary(docs[-1])
        print(
            f"{mode:>12} {x['ttft_mean_ms']:>13.1f} {x.get('frontend_ttft_ms_mean', float('nan')):>16.1f} "
            f"{x.get('router_ttft_ms_mean', float('nan')):>14.1f} {x.get('router_decision_ms_mean', float('nan')):>17.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    name = "router_kv_vs_rr" if args.workload == "pressure" else f"router_kv_vs_rr_{args.workload}"
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"workload": args.workload, "summary": summary, "raw": rows}, indent=2))
    plots.save(
        out,
        plots.Chart(
            [
                plots.Bars("TTFT p50", "ms", {m: {"TTFT p50": s["ttft_p50_ms"]} for m, s in summary.items()}),
                plots.Bars(
                    "prompt cache hit rate",
                    "%",
                    {m: {"hit rate": s["cache_hit_rate"] * 100} for m, s in summary.items()},
                ),
            ],
            title=f"kv, kv-classic and round-robin routing, {args.workload} workload (medians over rounds)",
        ),
    )


if __name__ == "__main__":
    main()
