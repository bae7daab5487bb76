"""The SLA planner on a bursty trace: a static deployment sized for the peak against one that the
planner scales with the local connector, both on mocker workers, in one run.

    python -m bench.planner_burst                  # profile, dry run, static run, planner run
    python -m bench.planner_burst --write-trace    # regenerate bench/traces/planner_burst.jsonl

Steps:

1. the trace (``bench/traces/planner_burst.jsonl``, Mooncake JSONL): quiet, a burst at four times
   the rate, quiet; Poisson arrivals, ~256-token prompts, 24 output tokens;
2. ``tokenyard profile`` of one mocker worker with the bench's engine settings (slowed down five
   times, so that a step lasts tens of milliseconds and CPU jitter on a busy machine matters less);
3. ``tokenyard planner dry-run`` of the trace with that profile (PNG and JSON beside the results);
4. the static run: ``tokenyard up --engine mocker --workers N`` with N the count the planner's
   model asks for at the peak rate (at least 2), the trace replayed by the load generator at its
   own timestamps;
5. the planner run: ``tokenyard up --engine mocker --workers 1`` with the planner's local
   connector starting and stopping more workers, the same trace.

Each run reports the share of requests that met both targets (TTFT and mean ITL per request,
measured by the client) and the worker-seconds used while the trace played (the registered
workers, sampled twice a second). Goal: at least 90 % within the SLA with at most 60 % of the
static run's worker-seconds. Results: ``bench/results/planner_burst.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.loadgen.client import Endpoint, RequestRecord, open_session, stream_request
from bench.loadgen.runner import LoadShape, run_load
from bench.loadgen.workload import MooncakeWorkload, RequestSpec, load_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "bench" / "traces" / "planner_burst.jsonl"
RESULTS = ROOT / "bench" / "results"

# One mocker worker: 4096 KV tokens, 16 running requests, every step five times slower than the
# reference model, so one worker serves ~2 requests/s of this trace within the targets.
MOCKER_ENV = {
    "TOKENYARD_WORKER_MOCKER__NUM_GPU_BLOCKS": "256",
    "TOKENYARD_WORKER_MOCKER__BLOCK_SIZE": "16",
    "TOKENYARD_WORKER_MOCKER__MAX_NUM_SEQS": "16",
    "TOKENYARD_WORKER_MOCKER__SPEEDUP_RATIO": "0.2",
}
MOCKER_FLAGS = (
    "--mocker-num-gpu-blocks 256 --mocker-block-size 16 --mocker-max-num-seqs 16 --mocker-speedup-ratio 0.2"
)
TTFT_MS = 1000.0
ITL_MS = 200.0


def write_trace(path: Path, *, quiet_s: float, burst_s: float, rate: float, seed: int = 7) -> int:
    """Quiet at ``rate``, a burst at 4x, quiet again; Poisson arrivals. Returns the request count."""
    rng = np.random.default_rng(seed)
    phases = [(quiet_s, rate), (burst_s, 4 * rate), (quiet_s, rate)]
    rows: list[dict[str, object]] = []
    t = 0.0
    start = 0.0
    for duration, r in phases:
        t = start + rng.exponential(1 / r)
        while t < start + duration:
            isl = int(rng.integers(224, 289))
            rows.append(
                {
                    "timestamp": round(t * 1000, 1),
                    "input_length": isl,
                    "output_length": 24,
                    "hash_ids": [len(rows)],
                }
            )
            t += rng.exponential(1 / r)
        start += duration
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


# ---- a deployment ----------------------------------------------------------------------------------


@dataclass
class Ports:
    base: int

    @property
    def http(self) -> int:
        return self.base

    def up_flags(self) -> list[str]:
        b = self.base
        return [
            "--http-port",
            str(b),
            "--grpc-port",
            str(b + 1),
            "--router-port",
            str(b + 10),
            "--planner-port",
            str(b + 20),
            "--gms-metrics-port",
            str(b + 30),
            "--worker-port",
            str(b + 40),
            "--worker-metrics-port",
            str(b + 60),
        ]


class Deployment:
    def __init__(self, name: str, workdir: Path, ports: Ports, workers: int, env: dict[str, str]) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.discovery = f"dir://{self.dir / 'discovery'}"
        self.ports = ports
        self.log = open(self.dir / "up.log", "wb")  # noqa: SIM115 - closed in stop()
        argv = [
            sys.executable,
            "-m",
            "tokenyard.cli",
            "up",
            "--engine",
            "mocker",
            "--workers",
            str(workers),
            "--discovery",
            self.discovery,
            "--state-dir",
            str(self.dir / "state"),
            "--log-level",
            "info",
            *ports.up_flags(),
        ]
        self.proc = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **MOCKER_ENV, **env},
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 240.0) -> None:
        ready = self.dir / "state" / "up.ready"
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: tokenyard up exited with {self.proc.returncode}; see {self.log.name}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not ready after {timeout:.0f}s; see {self.log.name}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@dataclass
class WorkerSamples:
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def worker_seconds(self, start: float, end: float) -> float:
        total = 0.0
        for (t0, n), t1 in zip(
            zip(self.times, self.counts, strict=True), [*self.times[1:], end], strict=True
        ):
            a, b = max(t0, start), min(t1, end)
            if b > a:
                total += n * (b - a)
        return total


async def sample_workers(discovery_url: str, samples: WorkerSamples, stop: asyncio.Event) -> None:
    from tokenyard.common.discovery import open_discovery

    discovery = open_discovery(discovery_url)
    try:
        while not stop.is_set():
            workers = await discovery.instances("worker")
            samples.times.append(time.perf_counter())
            samples.counts.append(len(workers))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        await discovery.close()


@dataclass
class RunResult:
    name: str
    records: list[RequestRecord]
    worker_seconds: float
    duration_s: float
    samples: WorkerSamples

    def within(self) -> list[bool]:
        out = []
        for r in self.records:
            tpot = r.tpot_s
            ok = r.ok and r.ttft_s is not None and r.ttft_s * 1000 <= TTFT_MS
            ok = ok and (tpot is None or tpot * 1000 <= ITL_MS)
            out.append(ok)
        return out

    def summary(self) -> RunSummary:
        within = self.within()
        ttft = [r.ttft_s * 1000 for r in self.records if r.ttft_s is not None]
        tpot = [r.tpot_s * 1000 for r in self.records if r.tpot_s is not None]

        def pct(values: list[float], q: float) -> float:
            return round(float(np.percentile(values, q)), 1) if values else math.nan

        return RunSummary(
            requests=len(self.records),
            failed=sum(1 for r in self.records if not r.ok),
            within_sla=sum(within),
            within_sla_share=round(sum(within) / len(within), 4) if within else 0.0,
            ttft_ms_p50=pct(ttft, 50),
            ttft_ms_p99=pct(ttft, 99),
            itl_ms_p50=pct(tpot, 50),
            itl_ms_p99=pct(tpot, 99),
            worker_seconds=round(self.worker_seconds, 1),
            duration_s=round(self.duration_s, 1),
            max_workers=max(self.samples.counts, default=0),
        )


@dataclass(frozen=True)
class RunSummary:
    requests: int
    failed: int
    within_sla: int
    within_sla_share: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    worker_seconds: float
    duration_s: float
    max_workers: int


async def replay(name: str, deployment: Deployment, trace: Path) -> RunResult:
    workload = MooncakeWorkload(load_trace(trace), block_size=512, seed=1, path=str(trace))
    shape = LoadShape(fixed_schedule=True)
    samples = WorkerSamples()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_workers(deployment.discovery, samples, stop))
    target = f"http://127.0.0.1:{deployment.ports.http}"
    async with open_session(0, 600.0) as session:
        endpoint = Endpoint(
            url=f"{target}/v1/completions",
            api="completions",
            model="SmolLM2-135M-Instruct",
            prompt_format="tokens",
            ignore_eos=True,
        )

        async def send(spec: RequestSpec) -> RequestRecord:
            return await stream_request(session, endpoint, spec)

        t0 = time.perf_counter()
        result = await run_load(send, workload, shape)
        t1 = t0 + result.duration_s
    stop.set()
    await sampler
    return RunResult(name, result.records, samples.worker_seconds(t0, t1), result.duration_s, samples)


def planner_env(profile: Path, max_workers: int) -> dict[str, str]:
    return {
        "TOKENYARD_PLANNER_CONNECTOR": "local",
        "TOKENYARD_PLANNER_PROFILE": str(profile),
        "TOKENYARD_PLANNER_SLA__TTFT_MS": str(TTFT_MS),
        "TOKENYARD_PLANNER_SLA__ITL_MS": str(ITL_MS),
        "TOKENYARD_PLANNER_THROUGHPUT__INTERVAL": "10",
        "TOKENYARD_PLANNER_THROUGHPUT__PREDICTOR": "kalman",
        "TOKENYARD_PLANNER_LOAD__INTERVAL": "2",
        "TOKENYARD_PLANNER_REPLICAS__MIN_AGGREGATED": "1",
        "TOKENYARD_PLANNER_BUDGET__MAX_GPUS": str(max_workers + 1),
        "TOKENYARD_PLANNER_LOCAL__MAX_WORKERS": str(max_workers),
        "TOKENYARD_PLANNER_LOCAL__DRAIN_GRACE": "20",
    }


def peak_count(profile: Path, trace: Path, interval: float) -> int:
    """Workers the planner's own model asks for at the trace's busiest interval."""
    from tokenyard.planner.perf import ProfilePerfModel
    from tokenyard.planner.pools import Pool
    from tokenyard.planner.profile import load_profile
    from tokenyard.planner.throughput import Demand, Targets, plan_pool
    from tokenyard.planner.trace import load_trace as load_intervals

    model = ProfilePerfModel(load_profile(profile))
    t = load_intervals(trace, interval)
    busiest = max(t.intervals, key=lambda i: i.requests)
    demand = Demand(busiest.requests / t.interval_s, busiest.isl, busiest.osl)
    return plan_pool(model, Pool.AGGREGATED, demand, Targets(TTFT_MS, ITL_MS), queue_aware=True).replicas


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env={**os.environ})


def table(results: list[RunResult]) -> str:
    lines = [
        f"{'run':<10}{'requests':>9}{'within SLA':>12}{'TTFT p50/p99 ms':>18}{'ITL p50/p99 ms':>17}"
        f"{'worker-s':>10}{'max workers':>12}"
    ]
    for r in results:
        s = r.summary()
        lines.append(
            f"{r.name:<10}{s.requests:>9}{s.within_sla_share * 100:>11.1f}%"
            f"{f'{s.ttft_ms_p50}/{s.ttft_ms_p99}':>18}{f'{s.itl_ms_p50}/{s.itl_ms_p99}':>17}"
            f"{s.worker_seconds:>10}{s.max_workers:>12}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-trace", action="store_true", help="regenerate the trace and exit")
    p.add_argument("--quiet-s", type=float, default=120.0, help="each quiet phase, s (with --write-trace)")
    p.add_argument("--burst-s", type=float, default=60.0, help="the burst, s (with --write-trace)")
    p.add_argument("--rate", type=float, default=1.0, help="quiet request rate, req/s (with --write-trace)")
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--profile", type=Path, help="reuse this profile instead of sweeping a worker")
    p.add_argument("--port-base", type=int, default=20500, help="ports base .. base+260 are used")
    p.add_argument("--workdir", type=Path, help="logs and discovery (default: a temporary folder)")
    p.add_argument("--static-workers", type=int, help="default: the model's count at the peak, at least 2")
    p.add_argument("--max-workers", type=int, default=6, help="workers the planner may start at most")
    p.add_argument("--skip-static", action="store_true")
    p.add_argument("--output", type=Path, default=RESULTS / "planner_burst.json")
    ns = p.parse_args()
    if ns.write_trace:
        n = write_trace(ns.trace, quiet_s=ns.quiet_s, burst_s=ns.burst_s, rate=ns.rate)
        print(f"{ns.trace}: {n} requests")
        return 0
    workdir = ns.workdir or Path(tempfile.mkdtemp(prefix="planner-burst-"))
    workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    profile = ns.profile
    if profile is None:
        profile = RESULTS / "planner_burst_profile.json"
        run(
            [
                sys.executable,
                "-m",
                "tokenyard.cli",
                "profile",
                "--output",
                str(profile),
                "--worker-args",
                MOCKER_FLAGS,
                "--prefill-isl",
                "64,128,256,512,1024",
                "--decode-context",
                "128,256,512",
                "--repeats",
                "2",
                "--decode-osl",
                "16",
            ]
        )
    dry = RESULTS / "planner_burst_dry_run"
    run(
        [
            sys.executable,
            "-m",
            "tokenyard.cli",
            "planner",
            "dry-run",
            "--trace",
            str(ns.trace),
            "--profile",
            str(profile),
            "--output",
            str(dry),
            "--interval",
            "10",
            "--predictor",
            "kalman",
            "--sla-ttft-ms",
            str(TTFT_MS),
            "--sla-itl-ms",
            str(ITL_MS),
        ]
    )
    static_n = ns.static_workers or max(2, peak_count(profile, ns.trace, 10.0))
    ports = Ports(ns.port_base)
    results: list[RunResult] = []
    runs: list[tuple[str, int, dict[str, str]]] = [] if ns.skip_static else [("static", static_n, {})]
    runs.append(("planner", 1, planner_env(profile, ns.max_workers)))
    for name, workers, env in runs:
        print(f"[{name}] starting {workers} worker(s) ...", file=sys.stderr, flush=True)
        deployment = Deployment(name, workdir, ports, workers, env)
        try:
            deployment.wait_ready()
            time.sleep(3)
            print(f"[{name}] replaying {ns.trace.name} ...", file=sys.stderr, flush=True)
            results.append(asyncio.run(replay(name, deployment, ns.trace)))
        finally:
            deployment.stop()
        print(table(results[-1:]), file=sys.stderr, flush=True)
    print(table(results))
    doc: dict[str, object] = {
        "trace": str(ns.trace),
        "profile": str(profile),
        "targets": {"ttft_ms": TTFT_MS, "itl_ms": ITL_MS},
        "mocker": MOCKER_ENV,
        "static_workers": static_n,
        "runs": {r.name: asdict(r.summary()) for r in results},
        "worker_timeline": {
            r.name: {
                "t": [round(t - r.samples.times[0], 2) for t in r.samples.times],
                "workers": r.samples.counts,
            }
            for r in results
            if r.samples.times
        },
        "workdir": str(workdir),
    }
    by = {r.name: r.summary() for r in results}
    if "static" in by and "planner" in by:
        ratio = by["planner"].worker_seconds / max(1e-9, by["static"].worker_seconds)
        share = by["planner"].within_sla_share
        doc["planner_vs_static"] = {
            "worker_seconds_ratio": round(ratio, 4),
            "within_sla_share": share,
            "goal_met": share >= 0.9 and ratio <= 0.6,
        }
        print(
            f"planner: {share * 100:.1f}% within SLA with {ratio * 100:.1f}% of the static "
            f"deployment's worker-seconds (goal: >= 90% with <= 60%)"
        )
    ns.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results: {ns.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
