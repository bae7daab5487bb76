"""``tokenyard profile``: sweep one worker and write its performance profile for the planner.

Talks to a worker over gRPC (``--worker HOST:PORT``), or starts one itself (``--engine mocker``
or ``cpu``, with ``--worker-args``) and stops it afterwards. Two sweeps:

* prefill: for each prompt length, ``--repeats`` requests one at a time with one output token
  and fresh random tokens (no prefix cache hit); the median time to the first token;
* decode: for each cell of the (active KV tokens x context length) grid, ``round(kv / ctx)``
  requests at once (at most ``max_num_seqs``), each with a prompt of ``ctx - osl / 2`` tokens
  and ``--decode-osl`` output tokens; the mean inter-token latency after the first token.

The file format is described in ``tokenyard/planner/profile.py`` (and the planner's README).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
from pydantic import Field

from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.cli_settings import parse_settings
from tokenyard.common.settings import TlsSettings, settings_config
from tokenyard.common.tls import Tls, TlsError
from tokenyard.deploy.workers import WorkerLaunch, WorkerProcess, WorkerStartError, free_port
from tokenyard.planner.profile import Profile, ProfileError


class ProfileSettings(TlsSettings):
    model_config = settings_config("profile")
    service_name: ClassVar[str] = "profile"

    output: str = Field(default="profile.json", description="Where to write the profile (JSON).")
    worker: str = Field(default="", description="HOST:PORT of a worker to sweep; empty: start one.")
    engine: str = Field(default="mocker", description="Engine of the worker to start: mocker or cpu.")
    model: str = Field(default="SmolLM2-135M-Instruct", description="Model of the worker to start.")
    worker_args: str = Field(
        default="",
        description="More flags for the worker to start, shell-quoted (e.g. '--mocker-max-num-seqs 8').",
    )
    host: str = Field(default="127.0.0.1", description="Address the started worker binds to.")
    prefill_isl: str = Field(
        default="128,256,512,1024,2048,4096",
        description="Prompt lengths of the prefill sweep, tokens (longer than the context are dropped).",
    )
    decode_context: str = Field(
        default="256,512,1024,2048", description="Context lengths of the decode sweep, tokens."
    )
    decode_kv_points: int = Field(
        default=5,
        ge=2,
        le=32,
        description="Points along the active-KV axis, doubling from the largest context.",
    )
    decode_osl: int = Field(default=32, ge=4, le=4096, description="Output tokens per decode request.")
    repeats: int = Field(default=3, ge=1, le=100, description="Prefill requests per prompt length.")
    request_timeout: float = Field(default=300.0, gt=0, description="Seconds one request may take.")
    ready_timeout: float = Field(
        default=300.0, gt=0, description="Seconds the started worker gets to be ready."
    )


def _ints(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


class Sweeper:
    def __init__(
        self, stub: worker_pb2_grpc.WorkerServiceAsyncStub, model: str, timeout: float, vocab: int = 30000
    ) -> None:
        self.stub = stub
        self.model = model
        self.timeout = timeout
        self.rng = np.random.default_rng()
        self.vocab = vocab

    def _request(self, isl: int, osl: int) -> worker_pb2.GenerateRequest:
        return worker_pb2.GenerateRequest(
            request_id=f"profile-{uuid.uuid4().hex}",
            model=self.model,
            token_ids=[int(t) for t in self.rng.integers(1000, self.vocab, isl)],
            sampling=worker_pb2.SamplingParams(temperature=0.0),
            stop=worker_pb2.StopConditions(max_tokens=osl, min_tokens=osl, ignore_eos=True),
        )

    async def one(self, isl: int, osl: int) -> list[float]:
        """Arrival times (s, from the call) of every output token."""
        start = time.perf_counter()
        times: list[float] = []
        async for response in self.stub.Generate(self._request(isl, osl), timeout=self.timeout):
            now = time.perf_counter() - start
            times += [now] * len(response.token_ids)
        return times

    async def prefill(self, isl: int, repeats: int) -> float:
        ttfts = []
        for _ in range(repeats):
            times = await self.one(isl, 1)
            if not times:
                raise RuntimeError(f"the worker returned no token for a {isl}-token prompt")
            ttfts.append(times[0] * 1000.0)
        return statistics.median(ttfts)

    async def decode(self, concurrency: int, context: int, osl: int) -> float:
        isl = max(1, context - osl // 2)
        runs = await asyncio.gather(*(self.one(isl, osl) for _ in range(concurrency)))
        gaps = [(t[-1] - t[0]) / (len(t) - 1) * 1000.0 for t in runs if len(t) > 1]
        if not gaps:
            raise RuntimeError("decode requests returned fewer than two tokens")
        return statistics.fmean(gaps)


async def sweep(s: ProfileSettings, address: str, meta: dict[str, object]) -> Profile:
    tls = Tls.from_paths(s.tls_ca, s.tls_cert, s.tls_key)
    async with tls.channel(address, "worker") as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        described = await stub.Describe(worker_pb2.DescribeRequest(), timeout=30)
        card = described.model_card
        max_kv = int(card.total_kv_blocks * card.kv_cache_block_size)
        max_seqs = int(card.max_num_seqs) or 256
        max_batched = int(card.max_num_batched_tokens) or 8192
        context_limit = min(int(card.context_length) or max_kv, max_kv)
        sweeper = Sweeper(stub, card.name or s.model, s.request_timeout)
        isls = [x for x in _ints(s.prefill_isl) if 1 <= x < context_limit]
        if len(isls) < 2:
            raise RuntimeError(
                f"fewer than two prefill lengths fit the worker's context of {context_limit} tokens"
            )
        await sweeper.one(16, 2)  # warm-up: first calls pay for connection setup
        prefill = []
        for isl in isls:
            ms = await sweeper.prefill(isl, s.repeats)
            prefill.append(ms)
            print(f"prefill isl {isl:6d}: {ms:8.1f} ms", file=sys.stderr)
        contexts = [c for c in _ints(s.decode_context) if s.decode_osl < c <= context_limit]
        if len(contexts) < 2:
            raise RuntimeError(
                f"fewer than two decode contexts fit the worker's context of {context_limit} tokens"
            )
        top = min(max_kv, max_seqs * contexts[0])
        kvs = sorted({min(top, contexts[-1] * 2**i) for i in range(s.decode_kv_points)})
        if len(kvs) < 2:
            kvs = [contexts[-1], max(contexts[-1] + 1, top)]
        grid = np.zeros((len(kvs), len(contexts)))
        for i, kv in enumerate(kvs):
            for j, ctx in enumerate(contexts):
                n = int(min(max_seqs, max(1, round(kv / ctx)), max(1, max_kv // ctx)))
                grid[i, j] = await sweeper.decode(n, ctx, s.decode_osl)
                print(f"decode kv {kv:7d} ctx {ctx:5d} x{n:3d}: {grid[i, j]:7.2f} ms", file=sys.stderr)
    meta |= {
        "engine": described.engine,
        "model": card.name,
        "block_size": card.kv_cache_block_size,
        "total_kv_blocks": card.total_kv_blocks,
        "decode_osl": s.decode_osl,
        "repeats": s.repeats,
        "created_unix": int(time.time()),
    }
    return Profile(
        prefill_isl=np.asarray(isls, dtype=np.float64),
        prefill_ttft_ms=np.asarray(prefill, dtype=np.float64),
        decode_active_kv_tokens=np.asarray(kvs, dtype=np.float64),
        decode_context_length=np.asarray(contexts, dtype=np.float64),
        decode_itl=grid,
        max_kv_tokens=max_kv,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=max_batched,
        meta=meta,
    )


async def run(s: ProfileSettings) -> Profile:
    if s.worker:
        return await sweep(s, s.worker, {"worker": s.worker})
    import shlex

    with tempfile.TemporaryDirectory(prefix="tokenyard-profile-") as tmp:
        launch = WorkerLaunch(
            engine=s.engine,
            model=s.model,
            role="aggregated",
            host=s.host,
            discovery=f"dir://{tmp}/discovery",
            log_level="warning",
            extra_args=tuple(shlex.split(s.worker_args)),
        )
        worker = WorkerProcess("profiled-worker", launch, free_port(s.host), free_port(s.host), Path(tmp))
        await worker.start()
        try:
            await worker.wait_ready(s.ready_timeout)
            return await sweep(s, worker.address, {"worker_args": s.worker_args, "started_engine": s.engine})
        finally:
            await worker.stop(1.0)


def main(argv: Sequence[str]) -> int:
    prog = "tokenyard profile"
    settings, _ = parse_settings(ProfileSettings, argv, prog, __doc__ or "")
    try:
        profile = asyncio.run(run(settings))
    except (WorkerStartError, TlsError, ProfileError, RuntimeError, OSError) as exc:
        # ProfileError: what the sweep measured does not make a profile (say, an engine so fast
        # that every latency is zero); the message says which series.
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as exc:
        print(f"{prog}: error: the worker answered {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    profile.save(settings.output)
    print(f"profile: {settings.output}")
    return 0
