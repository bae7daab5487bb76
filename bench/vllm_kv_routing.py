"""KV-aware routing against round-robin across two vLLM workers, one run, same workload.

Each mode gets a fresh deployment on fixed ports from ``--port-base``: a router in that mode, two
workers running vLLM (``--engine vllm``, each pinned to its own core, a KV pool of about 80
blocks of 32 tokens, room for four of the workload's prefixes) and a frontend. The load
generator then sends 4 concurrent streams of prompts made of one of 8 shared 512-token prefixes
plus 32 tokens of their own, 16 output tokens each, as token ids. Reports TTFT p50 and the prompt
cache hit rate vLLM measured (``cached_tokens``), for both modes, and writes JSON to
bench/results/vllm_kv_routing.json (and a PNG of the same name).

    .venv-vllm/bin/python -m bench.vllm_kv_routing [--requests 64] [--port-base 18500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import plots
from bench.router_kv_vs_rr import RESULTS, _instances, _router_metrics, _start, _summary, _wait_http
from tokenyard.deploy.up import vllm_core_sets

WORKERS = 2
# 0.11 GiB of float32 SmolLM2 KV is 80 blocks of 32 tokens: four 544-token prompts and their
# outputs. vLLM wants room for one request of the whole context, hence the shorter context.
KV_GIB = 0.11
MAX_MODEL_LEN = 1024
WORKLOAD = [
    "--concurrency", "4",
    "--num-prefixes", "8", "--prefix-len", "512", "--suffix-len", "32", "--output-len", "16",
    "--ignore-eos", "--prompt-format", "tokens",
]  # fmt: skip


def run_mode(mode: str, requests: int, warmup: int, workdir: Path, port_base: int) -> dict[str, Any]:
    """One deployment in ``mode``, one load generator run against it."""
    out_dir = workdir / mode
    out_dir.mkdir(parents=True)
    url = f"dir://{out_dir / 'discovery'}"
    common = ["--host", "127.0.0.1", "--discovery", url, "--log-level", "warning"]
    router_port, grpc_port, http_port = port_base, port_base + 1, port_base + 2
    procs = [
        _start(
            [
                "router",
                *common,
                "--port",
                str(router_port),
                "--metrics-port",
                str(router_port + 100),
                "--mode",
                mode,
            ],
            out_dir / "router.log",
        )
    ]
    cores = vllm_core_sets(WORKERS)  # as `tokenyard up` pins them: a core (or a slice) each
    for i in range(WORKERS):
        worker_port = port_base + 10 + i
        worker = [
            "worker", *common,
            "--port", str(worker_port), "--metrics-port", str(worker_port + 100),
            "--engine", "vllm",
            "--vllm-kv-cache-gib", str(KV_GIB),
            "--vllm-max-model-len", str(MAX_MODEL_LEN),
            *(["--vllm-omp-threads-bind", cores[i]] if cores else []),
        ]  # fmt: skip
        procs.append(_start(worker, out_dir / f"worker-{i}.log"))
    try:
        started = time.monotonic()
        asyncio.run(_instances(url, "worker", WORKERS, timeout=600))
        workers_ready_s = time.monotonic() - started
        router = asyncio.run(_instances(url, "router", 1))[0]
        procs.append(
            _start(
                ["frontend", *common, "--port", str(grpc_port), "--http-port", str(http_port)],
                out_dir / "frontend.log",
            )
        )
        _wait_http(http_port)
        out = out_dir / "loadgen.json"
        subprocess.run(
            [
                sys.executable, "-m", "bench.loadgen",
                "--target", f"http://127.0.0.1:{http_port}",
                *WORKLOAD,
                "--num-requests", str(requests), "--warmup", str(warmup),
                "--progress", "off", "--output", str(out),
            ],
            check=True,
        )  # fmt: skip
        doc = dict(json.loads(out.read_text()))
        doc["router_metrics"] = _router_metrics(router.metrics_address)
        doc["workers_ready_s"] = workers_ready_s
        return doc
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--port-base", type=int, default=18500, help="first of the ports the deployment uses")
    parser.add_argument("--modes", default="kv,round-robin", help="comma-separated router modes")
    args = parser.parse_args()
    modes = args.modes.split(",")
    docs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vllm-kv-routing-") as tmp:
        for mode in modes:
            docs[mode] = run_mode(mode, args.requests, args.warmup, Path(tmp), args.port_base)
    print(
        f"\n{WORKERS} vLLM workers x ~80 KV blocks of 32 tokens, 8 prefixes x 512 + 32 tokens, "
        "16 out, 4 streams"
    )
    print(f"{'mode':>12} {'TTFT p50 ms':>12} {'cache hit':>10} {'failed':>7} {'workers up s':>13}")
    summary: dict[str, dict[str, float]] = {}
    for mode, doc in docs.items():
        s = _summary(doc)
        s["workers_ready_s"] = float(doc["workers_ready_s"])
        summary[mode] = s
        print(
            f"{mode:>12} {s['ttft_p50_ms']:>12.1f} {s['cache_hit_rate']:>10.2f} "
            f"{s['requests_failed']:>7.0f} {s['workers_ready_s']:>13.1f}"
        )
    if {"kv", "round-robin"} <= summary.keys():
        rr, kv = summary["round-robin"], summary["kv"]
        print(f"round-robin / kv TTFT p50: {rr['ttft_p50_ms'] / kv['ttft_p50_ms']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "vllm_kv_routing.json"
    path.write_text(json.dumps({"summary": summary, "raw": docs}, indent=2))
    picture = plots.save(
        path,
        plots.Chart(
            [
                plots.Bars("TTFT p50", "ms", {m: {"TTFT p50": s["ttft_p50_ms"]} for m, s in summary.items()}),
                plots.Bars(
                    "prompt cache hit rate",
                    "%",
                    {m: {"hit rate": s["cache_hit_rate"] * 100} for m, s in summary.items()},
                ),
            ],
            title=f"kv against round-robin routing, {WORKERS} vLLM workers",
        ),
    )
    print(f"results: {path} ({picture.name})")


if __name__ == "__main__":
    main()
