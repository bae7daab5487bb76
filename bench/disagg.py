"""Aggregated against disaggregated serving on mocker workers, at fixed Poisson request rates.

Two deployments of four workers each, one after the other, each with a KV router and a frontend:

* ``aggregated``: four aggregated workers (each prefills and decodes);
* ``disaggregated``: two prefill and two decode workers; the frontend prefills each request on the
  prefill pool (its default policy, isl_or_load, decides) and decodes it on the decode pool.

The mocker runs the reference timing model (prefill polynomial in the step's new tokens, decode
linear-quadratic in KV occupancy, 16384 blocks of 64 tokens, 8192 batched tokens per step) in real
time. The prefill workers charge a KV hand-off of ``prompt tokens * --kv-bytes-per-token /
--kv-bandwidth-gbps`` before releasing a request; the defaults are Llama-3.1-8B's KV in bf16 (32
layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 131072 bytes per token) over 64 GB/s (the
reference's default transfer bandwidth), 6.1 ms for a 3000-token prompt.

Requests: ``--prompt-len`` (3000) token-id prompts that share little (one of 8 system prompts of
256 tokens, then tokens of their own), 150-200 output tokens each (uniform, ignoring EOS), sent by
the load generator (``bench.loadgen``) with Poisson arrivals at each rate of ``--rates`` for
``--duration`` seconds. Both deployments get the same requests.

Printed per rate and deployment: TTFT p50/p99, ITL p50/p99 (every gap between tokens, all
requests), mean ITL per request p50, and goodput, the share of requests with TTFT <= 250 ms and mean
ITL <= 8 ms (``--ttft-slo-ms``, ``--itl-slo-ms``); for the disaggregated one also its decisions
(remote/local) and failed prefill stages. Results go to bench/results/disagg.json, with
disagg.png beside it (TTFT, ITL and goodput against the rate).

    .venv/bin/python -m bench.disagg [--rates 4,8,12,16] [--duration 30]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench import plots
from bench.loadgen.client import Endpoint, RequestRecord, endpoint_url, open_session, stream_request
from bench.loadgen.cpu import CpuMeter
from bench.loadgen.runner import LoadShape, run_load
from bench.loadgen.stats import percentile
from bench.loadgen.workload import RequestSpec, SharedPrefixWorkload, TokenRange
from tokenyard.common.discovery import Instance, open_discovery

RESULTS = Path(__file__).parent / "results"
MODEL = "SmolLM2-135M-Instruct"
CONFIGS = ("aggregated", "disaggregated")
# Llama-3.1-8B, bf16: layers * KV heads * head dim * (K and V) * bytes.
LLAMA_8B_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2


async def _instances(
    url: str, service: str, count: int, procs: list[subprocess.Popen[bytes]]
) -> list[Instance]:
    discovery = open_discovery(url)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            found = await discovery.instances(service)
            if len(found) >= count:
                return found
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a process exited while waiting for {count} {service}(s)")
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{count} {service}(s) did not register in time")
    finally:
        await discovery.close()


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokenyard.cli", *argv], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def _metrics(session: aiohttp.ClientSession, address: str) -> Samples:
    """Every sample of a service's /metrics, by name and labels."""
    async with session.get(f"http://{address}/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


class Deployment:
    """A router, four workers and a frontend as processes, in a fresh discovery directory."""

    def __init__(self, config: str, workdir: Path, args: argparse.Namespace) -> None:
        self.config = config
        self.dir = workdir / config
        self.dir.mkdir(parents=True)
        self.url = f"dir://{self.dir / 'discovery'}"
        self.args = args
        self.procs: list[subprocess.Popen[bytes]] = []
        self.frontend = ""

    def roles(self) -> list[str]:
        if self.config == "aggregated":
            return ["aggregated"] * 4
        return ["prefill", "prefill", "decode", "decode"]

    async def __aenter__(self) -> Deployment:
        a = self.args
        common = ["--port", "0", "--metrics-port", "0", "--discovery", self.url, "--log-level", "warning"]
        self.procs.append(_start(["router", *common, "--mode", "kv"], self.dir / "router.log"))
        mocker = ["--mocker-speedup-ratio", str(a.speedup)]
        for i, role in enumerate(self.roles()):
            flags = [*common, *mocker]
            if role != "aggregated":
                flags += ["--role", role]
            if role == "prefill":
                flags += [
                    "--mocker-kv-bytes-per-token", str(a.kv_bytes_per_token),
                    "--mocker-kv-transfer-bandwidth-gbps", str(a.kv_bandwidth_gbps),
                ]  # fmt: skip
            self.procs.append(_start(["worker", *flags], self.dir / f"worker-{i}-{role}.log"))
        await _instances(self.url, "worker", 4, self.procs)
        await _instances(self.url, "router", 1, self.procs)
        frontend = [
            "frontend", "--port", "0", "--http-port", "0", "--discovery", self.url, "--log-level", "warning",
            "--disagg-policy", a.policy,
        ]  # fmt: skip
        self.procs.append(_start(frontend, self.dir / "frontend.log"))
        self.frontend = (await _instances(self.url, "frontend", 1, self.procs))[0].metrics_address
        await self._ready()
        return self

    async def _ready(self) -> None:
        """The frontend serves the model (and, split, has prefilled a request remotely)."""
        body = {"model": MODEL, "prompt": list(range(1000, 1300)), "max_tokens": 2}
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while time.monotonic() < deadline:
                try:
                    async with session.post(f"http://{self.frontend}/v1/completions", json=body) as resp:
                        await resp.read()
                        served = resp.status == 200
                    if served and self.config == "aggregated":
                        return
                    samples = await _metrics(session, self.frontend)
                    if served and _sum(samples, "tokenyard_frontend_disagg_prefill_seconds_count") > 0:
                        return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.3)
        raise RuntimeError(f"{self.config}: the frontend never served a request")

    async def __aexit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def workload(args: argparse.Namespace) -> Iterator[RequestSpec]:
    """The same endless requests for every deployment: little sharing, 150-200 output tokens."""
    base = SharedPrefixWorkload(
        num_prefixes=8,
        prefix_len=args.shared_len,
        suffix_len=args.prompt_len - args.shared_len,
        output_len=args.output_max,
        seed=args.seed,
        tokens=TokenRange(1000, 30000),
    )
    for spec in base:
        rng = np.random.default_rng([args.seed, 7, spec.index])
        yield dataclasses.replace(spec, output_len=int(rng.integers(args.output_min, args.output_max + 1)))


def summarize(records: list[RequestRecord], args: argparse.Namespace, duration: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    scale = 1000.0 * args.speedup  # wall seconds -> model milliseconds
    ttft = sorted(r.ttft_s * scale for r in ok if r.ttft_s is not None)
    gaps = sorted(g * scale for r in ok for g in r.itl_s)
    mean_itl = sorted(r.tpot_s * scale for r in ok if r.tpot_s is not None)
    good = sum(
        1
        for r in ok
        if r.ttft_s is not None
        and r.tpot_s is not None
        and r.ttft_s * scale <= args.ttft_slo_ms
        and r.tpot_s * scale <= args.itl_slo_ms
    )

    def pct(values: list[float], q: float) -> float:
        return percentile(values, q) if values else math.nan

    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "throughput_rps": len(ok) / (duration * args.speedup) if duration else 0.0,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
        "mean_itl_p50_ms": pct(mean_itl, 50),
        "mean_itl_p99_ms": pct(mean_itl, 99),
        "goodput": good / len(records) if records else 0.0,
        "cached_tokens": sum(r.cached_tokens or 0 for r in ok),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
    }


def _disagg_counts(before: Samples, after: Samples) -> dict[str, float]:
    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    out = {
        "remote": delta("tokenyard_frontend_disagg_decisions_total", decision="remote"),
        "local": delta("tokenyard_frontend_disagg_decisions_total", decision="local"),
        "prefill_failures": delta("tokenyard_frontend_disagg_prefill_failures_total"),
    }
    for key, value in after.items():
        name, labels = key
        if name == "tokenyard_frontend_disagg_decisions_total":
            d = dict(labels)
            n = value - before.get(key, 0.0)
            if n:
                out[f"{d['decision']}:{d['reason']}"] = n
    return out


async def run_config(config: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"config": config, "rates": {}}
    async with Deployment(config, workdir, args) as dep:
        endpoint = Endpoint(
            url=endpoint_url(f"http://{dep.frontend}", "completions"), api="completions", model=MODEL,
            prompt_format="tokens",
        )  # fmt: skip
        specs = workload(args)
        async with open_session(0, 300) as session:
            send = partial(stream_request, session, endpoint)
            warm = LoadShape(concurrency=4, num_requests=args.warmup)
            await run_load(send, specs, warm)
            for rate in args.rates:
                # A model second lasts 1 / speedup seconds of wall time.
                wall_rate = rate * args.speedup
                shape = LoadShape(rate=wall_rate, duration_s=args.duration / args.speedup, seed=args.seed)
                meter = CpuMeter([p.pid for p in dep.procs])
                before = await _metrics(session, dep.frontend)
                meter.start()
                result = await run_load(send, specs, shape)
                cpu = meter.stop()
                after = await _metrics(session, dep.frontend)
                row = summarize(result.records, args, result.duration_s)
                row["server_cpu_cores"] = cpu.seconds / result.duration_s if result.duration_s else 0.0
                if config == "disaggregated":
                    row["decisions"] = _disagg_counts(before, after)
                out["rates"][str(rate)] = row
                print(_line(config, rate, row), flush=True)
                # Let the cache-free tail drain before the next rate.
                await asyncio.sleep(1.0)
    return out


def _line(config: str, rate: float, r: dict[str, Any]) -> str:
    extra = ""
    if "decisions" in r:
        d = r["decisions"]
        extra = f"  remote {d['remote']:.0f} local {d['local']:.0f} failed {d['prefill_failures']:.0f}"
    return (
        f"{rate:>6g} {config:>14} {r['ok']:>5}/{r['requests']:<5} {r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f}"
        f" {r['itl_p50_ms']:>8.2f} {r['itl_p99_ms']:>8.2f} {r['mean_itl_p50_ms']:>9.2f} {r['goodput']:>8.3f}"
        f" {r['server_cpu_cores']:>5.2f}{extra}"
    )


HEADER = (
    f"{'req/s':>6} {'deployment':>14} {'ok/sent':>11} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8}"
    f" {'ITL p99':>8} {'mITL p50':>9} {'goodput':>8} {'cpu':>5}"
)


def verdict(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    agg, dis = results.get("aggregated"), results.get("disaggregated")
    if agg is None or dis is None:
        return []
    lines = ["", "per rate: disaggregated against aggregated"]
    breakdown = None
    for rate in args.rates:
        a, d = agg["rates"][str(rate)], dis["rates"][str(rate)]
        itl_ratio = d["itl_p99_ms"] / a["itl_p99_ms"] if a["itl_p99_ms"] else math.nan
        lines.append(
            f"{rate:>6g} req/s: ITL p99 x{itl_ratio:.3f}, TTFT p50 {d['ttft_p50_ms'] - a['ttft_p50_ms']:+.1f} ms,"
            f" goodput {a['goodput']:.3f} -> {d['goodput']:.3f}"
        )
        if breakdown is None and a["goodput"] < 0.9:
            breakdown = rate
    if breakdown is None:
        lines.append("aggregated kept goodput >= 0.9 at every rate: sweep higher rates to find its limit")
        return lines
    a, d = agg["rates"][str(breakdown)], dis["rates"][str(breakdown)]
    low = args.rates[0]
    cost = dis["rates"][str(low)]["ttft_p50_ms"] - agg["rates"][str(low)]["ttft_p50_ms"]
    ratio = d["itl_p99_ms"] / a["itl_p99_ms"]
    lines += [
        f"aggregated breaks down at {breakdown:g} req/s (goodput {a['goodput']:.3f} < 0.9)",
        f"  goal ITL p99 <= 0.2x aggregated: x{ratio:.3f} ({'met' if ratio <= 0.2 else 'missed'})",
        f"  goal goodput >= 0.9: {d['goodput']:.3f} ({'met' if d['goodput'] >= 0.9 else 'missed'})",
        f"  goal TTFT p50 cost < 10 ms (at {low:g} req/s): {cost:+.1f} ms ({'met' if cost < 10 else 'missed'})",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="4,8,12,16", help="requests per second to sweep (comma-separated)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate")
    parser.add_argument("--warmup", type=int, default=16, help="requests sent before the first rate")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="deployments to run, in order")
    parser.add_argument("--prompt-len", type=int, default=3000)
    parser.add_argument("--shared-len", type=int, default=256, help="tokens of the 8 shared system prompts")
    parser.add_argument("--output-min", type=int, default=150)
    parser.add_argument("--output-max", type=int, default=200)
    parser.add_argument("--kv-bytes-per-token", type=int, default=LLAMA_8B_KV_BYTES_PER_TOKEN)
    parser.add_argument("--kv-bandwidth-gbps", type=float, default=64.0)
    parser.add_argument("--policy", default="isl_or_load", help="the frontend's --disagg-policy")
    parser.add_argument("--ttft-slo-ms", type=float, default=250.0)
    parser.add_argument("--itl-slo-ms", type=float, default=8.0)
    parser.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="mocker speedup ratio; rates, durations and every figure stay in model time "
        "(below 1 eases a machine too small to run the deployment in real time)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "disagg.json")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    # SIGTERM unwinds like Ctrl-C, so that the deployment's processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    configs = args.configs.split(",")
    transfer_ms = args.prompt_len * args.kv_bytes_per_token / (args.kv_bandwidth_gbps * 1e9) * 1000
    print(
        f"4 mocker workers, reference timing model, speedup {args.speedup:g}; {args.prompt_len}-token prompts "
        f"({args.shared_len} shared), {args.output_min}-{args.output_max} output tokens, Poisson arrivals, "
        f"{args.duration:g} s per rate; KV hand-off {args.kv_bytes_per_token} B/token at "
        f"{args.kv_bandwidth_gbps:g} GB/s = {transfer_ms:.1f} ms per prompt; goodput: TTFT <= "
        f"{args.ttft_slo_ms:g} ms and mean ITL <= {args.itl_slo_ms:g} ms; times in ms"
    )
    print(HEADER, flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="disagg-bench-") as tmp:
        for config in configs:
            results[config] = asyncio.run(run_config(config, Path(tmp), args))
    lines = verdict(results, args)
    print("\n".join(lines))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output.write_text(json.dumps({"settings": settings, "results": results, "verdict": lines}, indent=2))
    picture = plots.save(args.output, chart(results, args))
    print(f"results: {args.output}, {picture}")


def chart(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> plots.Chart:
    """TTFT, ITL and goodput against the request rate, one line per deployment and percentile."""

    def lines(*keys: str) -> dict[str, list[tuple[float, float]]]:
        return {
            f"{config} {key.split('_')[-2]}" if len(keys) > 1 else config: [
                (float(rate), float(row[key])) for rate, row in r["rates"].items()
            ]
            for config, r in results.items()
            for key in keys
        }

    return plots.Chart(
        [
            plots.Lines("TTFT", "requests/s", "ms", lines("ttft_p50_ms", "ttft_p99_ms"), logy=True),
            plots.Lines("ITL (every gap)", "requests/s", "ms", lines("itl_p50_ms", "itl_p99_ms"), logy=True),
            plots.Lines("goodput", "requests/s", "share of requests", lines("goodput")),
        ],
        title="aggregated (4 workers) against disaggregated (2 prefill + 2 decode), mocker workers",
        notes=(
            f"goodput: TTFT <= {args.ttft_slo_ms:g} ms and mean ITL <= {args.itl_slo_ms:g} ms; "
            f"{args.prompt_len}-token prompts, {args.output_min}-{args.output_max} output tokens, "
            f"KV hand-off {args.kv_bytes_per_token} B/token at {args.kv_bandwidth_gbps:g} GB/s",
        ),
    )


if __name__ == "__main__":
    main()
