"""KV transfer between two CPU workers on loopback: how fast a decode worker pulls a prompt's KV.

Two ``tokenyard worker --engine cpu`` processes (SmolLM2-135M-Instruct, float32 KV, 16-token
blocks of 720 KiB), one ``--role prefill`` and one ``--role decode``. For each prompt length, with
fresh random prompts (so the decode worker holds none of it):

* *pull*: the prefill worker computes the prompt (``prefill_only``); the decode worker receives a
  Generate with its ``kv_transfer``, fetches the blocks over ``FetchKvBlocks`` and imports them.
  The time is the decode worker's own measurement (``tokenyard_worker_kv_transfer_seconds``,
  fetch and import), read from its /metrics before and after.
* *stream*: the same FetchKvBlocks stream read by this script instead of a decode worker: the
  transport alone, without the import.
* *prefill*: the decode worker computing the same prompt itself, the work a transfer saves.

Prints a table (MB/s, and ms per prompt scaled to 1k tokens) and writes JSON to
bench/results/kv_transfer.json. No same-host shared-memory path exists, so none is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc

RESULTS = Path(__file__).parent / "results" / "kv_transfer.json"
MODEL = "SmolLM2-135M-Instruct"
MB = 1e6


class Worker:
    def __init__(self, role: str, port: int, metrics_port: int, threads: int, log_dir: Path) -> None:
        self.address = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        folder = Path("/tmp/disagg-worker") / f"bench-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.log = open(log_dir / f"{role}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokenyard.cli",
                "worker",
                "--engine=cpu",
                f"--role={role}",
                "--host=127.0.0.1",
                f"--port={port}",
                f"--metrics-port={metrics_port}",
                f"--discovery=dir://{folder}",
                f"--cpu-num-threads={threads}",
                "--cpu-kv-cache-gib=1",
                "--cpu-max-num-batched-tokens=2048",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.aio.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)

    async def ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"worker exited with {self.proc.returncode}; see {self.log.name}")
            try:
                await self.stub.Describe(worker_pb2.DescribeRequest(), timeout=2)
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"worker at {self.address} not ready in {timeout}s") from None
                await asyncio.sleep(0.5)

    def scrape(self, name: str) -> float:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    async def generate(self, request: worker_pb2.GenerateRequest) -> list[worker_pb2.GenerateResponse]:
        return [r async for r in self.stub.Generate(request, timeout=600)]

    async def stop(self) -> None:
        await self.channel.close(None)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def request(request_id: str, prompt: list[int], max_tokens: int) -> worker_pb2.GenerateRequest:
    r = worker_pb2.GenerateRequest(request_id=request_id, model=MODEL, token_ids=prompt)
    r.stop.max_tokens = max_tokens
    r.stop.ignore_eos = True
    r.sampling.temperature = 0.0
    return r


RECEIVED_S = 'tokenyard_worker_kv_transfer_seconds_sum{direction="received"}'
RECEIVED_B = 'tokenyard_worker_kv_transfer_bytes_total{direction="received"}'
FALLBACKS = "tokenyard_worker_kv_transfer_fallbacks_total"


async def measure(
    prefill: Worker, decode: Worker, tokens: int, reps: int, rng: random.Random
) -> dict[str, Any]:
    pull_s: list[float] = []
    stream_s: list[float] = []
    local_s: list[float] = []
    nbytes = 0
    blocks = 0
    for rep in range(reps):
        # pull: prefill there, fetch and import here
        prompt = [rng.randrange(100, 49000) for _ in range(tokens)]
        rid = f"pull-{tokens}-{rep}-{uuid.uuid4().hex[:6]}"
        pf = request(rid, prompt, 1)
        pf.disaggregation.prefill_only = True
        transfer = (await prefill.generate(pf))[-1].kv_transfer
        before_s, before_b = decode.scrape(RECEIVED_S), decode.scrape(RECEIVED_B)
        dec = request(rid, prompt, 1)
        dec.disaggregation.kv_transfer.CopyFrom(transfer)
        last = (await decode.generate(dec))[-1]
        seconds = decode.scrape(RECEIVED_S) - before_s
        moved = decode.scrape(RECEIVED_B) - before_b
        if moved <= 0:
            raise SystemExit(f"the decode worker did not import the transfer (see {decode.log.name})")
        assert last.usage.cached_tokens >= (tokens - 1) // 16 * 16
        pull_s.append(seconds)
        nbytes, blocks = int(moved), len(transfer.block_hashes)

        # stream: the transport alone, read here
        prompt = [rng.randrange(100, 49000) for _ in range(tokens)]
        rid = f"stream-{tokens}-{rep}-{uuid.uuid4().hex[:6]}"
        pf = request(rid, prompt, 1)
        pf.disaggregation.prefill_only = True
        await prefill.generate(pf)
        started = time.perf_counter()
        received = 0
        async for message in prefill.stub.FetchKvBlocks(
            worker_pb2.FetchKvBlocksRequest(transfer_id=rid, release=True), timeout=600
        ):
            received += len(message.data)
        stream_s.append(time.perf_counter() - started)
        assert received == nbytes

        # prefill: the decode worker computes a fresh prompt of the same length itself (slow, and
        # steady: two samples)
        if rep >= 2:
            continue
        prompt = [rng.randrange(100, 49000) for _ in range(tokens)]
        started = time.perf_counter()
        await decode.generate(request(f"local-{tokens}-{rep}-{uuid.uuid4().hex[:6]}", prompt, 1))
        local_s.append(time.perf_counter() - started)
    pull = statistics.median(pull_s)
    stream = statistics.median(stream_s)
    local = statistics.median(local_s)
    return {
        "prompt_tokens": tokens,
        "blocks": blocks,
        "bytes": nbytes,
        "reps": reps,
        "pull_s_median": pull,
        "pull_mb_s": nbytes / MB / pull,
        "pull_ms_per_1k_tokens": pull * 1000 * 1024 / tokens,
        "stream_s_median": stream,
        "stream_mb_s": nbytes / MB / stream,
        "local_prefill_s_median": local,
        "local_prefill_ms_per_1k_tokens": local * 1000 * 1024 / tokens,
        "pull_s_samples": pull_s,
        "stream_s_samples": stream_s,
        "local_prefill_s_samples": local_s,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(0)
    log_dir = Path(tempfile.mkdtemp(prefix="tokenyard-kv-bench-"))
    base = args.port_base
    prefill = Worker("prefill", base, base + 1, args.threads, log_dir)
    decode = Worker("decode", base + 2, base + 3, args.threads, log_dir)
    try:
        await asyncio.gather(prefill.ready(), decode.ready())
        await measure(prefill, decode, 64, 2, rng)  # warm-up: first-touch of pools and channels
        rows = [await measure(prefill, decode, n, args.reps, rng) for n in args.tokens]
        fallbacks = decode.scrape(f'{FALLBACKS}{{reason="unreachable"}}') + decode.scrape(
            f'{FALLBACKS}{{reason="error"}}'
        )
    finally:
        await asyncio.gather(prefill.stop(), decode.stop())
    return {"rows": rows, "fallbacks": fallbacks, "logs": str(log_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048], help="prompt lengths")
    parser.add_argument("--reps", type=int, default=5, help="transfers per prompt length")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--port-base", type=int, default=19410, help="four consecutive ports from here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    rows = result["rows"]
    print(f"KV transfer between two CPU workers on loopback ({platform.processor() or platform.machine()})")
    print("SmolLM2-135M-Instruct, float32 KV: 30 layers x 3 KV heads x 64 dims, 16-token blocks of 737,280 B")
    print()
    header = (
        f"{'prompt':>7} {'blocks':>6} {'MB':>7} {'pull ms':>8} {'pull MB/s':>10} {'ms/1k tok':>10} "
        f"{'stream MB/s':>12} {'prefill ms/1k tok':>18}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['prompt_tokens']:>7} {r['blocks']:>6} {r['bytes'] / MB:>7.1f} {r['pull_s_median'] * 1000:>8.1f} "
            f"{r['pull_mb_s']:>10.0f} {r['pull_ms_per_1k_tokens']:>10.1f} {r['stream_mb_s']:>12.0f} "
            f"{r['local_prefill_ms_per_1k_tokens']:>18.0f}"
        )
    print()
    print("pull: the decode worker's fetch + import (its own metric); stream: FetchKvBlocks read by a")
    print("plain client; prefill: the decode worker computing the prompt itself. Medians.")
    print("No same-host shared-memory path is built, so none is measured.")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "bench": "kv_transfer",
                "machine": platform.platform(),
                "python": platform.python_version(),
                "threads_per_worker": args.threads,
                **result,
            },
            indent=2,
        )
    )
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
