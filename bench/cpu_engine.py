"""The CPU engine on SmolLM2-135M-Instruct: model load, prefix-cache TTFT, batched decode.

* Load: converting the GGUF file into a fresh cache directory (a first start) and loading the
  converted weights again (every later start).
* TTFT: a prompt whose first ``--prefix`` tokens are already cached against the same prompt cold
  (cache reset first), same engine, same run. Target: cached at least 5x faster.
* Decode: aggregate output tokens per second of ``--streams`` concurrent greedy streams against one
  stream alone, same engine, same run. Target: at least 3x.

Prints tables and writes JSON to bench/results/cpu_engine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench import plots
from tokenyard.worker.engines.base import EngineRequest, SamplingParams
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.engine import CpuEngine, default_num_threads
from tokenyard.worker.engines.cpu.model import load_model

GREEDY = SamplingParams(temperature=0.0)
RESULTS = Path(__file__).parent / "results" / "cpu_engine.json"


def measure_load(threads: int) -> dict[str, float]:
    # In a process of its own: torch work in this process outside the engines' compute threads
    # would leave an OpenMP thread team behind that slows them (see CpuEngine._build).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_load, threads).result()


def _measure_load(threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="tokenyard-bench-") as tmp:
        config = CpuEngineConfig(cache_dir=Path(tmp))
        cold = load_model(config)
        assert cold.converted
        cached = load_model(config)
        assert not cached.converted
    return {"cold_convert_and_load_s": cold.load_seconds, "cached_load_s": cached.load_seconds}


async def first_token_s(engine: CpuEngine, request: EngineRequest) -> tuple[float, int]:
    """Seconds to the first token, and the prompt tokens the cache supplied (a one-token request)."""
    started = time.perf_counter()
    first: float | None = None
    cached = 0
    async for chunk in engine.generate(request):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            cached = chunk.usage.cached_tokens
    assert first is not None, "no token"
    return first, cached


async def measure_ttft(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(0)
    config = CpuEngineConfig(num_threads=args.threads, max_num_batched_tokens=args.chunk)
    prefix = [rng.randrange(100, 49000) for _ in range(args.prefix)]
    cold_samples: list[float] = []
    cached_samples: list[float] = []
    hits: list[int] = []
    async with CpuEngine(config) as engine:
        for i in range(2):  # warm-up: first-touch of the pools, kernel selection
            await first_token_s(engine, EngineRequest(f"warmup-{i}", tuple(prefix[:256]), 1, sampling=GREEDY))
        for i in range(args.repeat):
            suffix = [rng.randrange(100, 49000) for _ in range(args.suffix)]
            prompt = (*prefix, *suffix)
            engine.reset_prefix_cache()
            seconds, hit = await first_token_s(engine, EngineRequest(f"cold-{i}", prompt, 1, sampling=GREEDY))
            assert hit == 0
            cold_samples.append(seconds)
            # Another request with the same first tokens puts them in the cache ...
            other = (*prefix, *(rng.randrange(100, 49000) for _ in range(args.suffix)))
            engine.reset_prefix_cache()
            await first_token_s(engine, EngineRequest(f"warm-{i}", other, 1, sampling=GREEDY))
            # ... then the measured prompt finds them.
            seconds, hit = await first_token_s(
                engine, EngineRequest(f"cached-{i}", prompt, 1, sampling=GREEDY)
            )
            cached_samples.append(seconds)
            hits.append(hit)
    cold, cached = statistics.median(cold_samples), statistics.median(cached_samples)
    return {
        "prompt_tokens": args.prefix + args.suffix,
        "cached_prefix_tokens": min(hits),
        "cold_ttft_s": cold,
        "cached_ttft_s": cached,
        "speedup": cold / cached,
        "cold_samples_s": cold_samples,
        "cached_samples_s": cached_samples,
    }


async def decode_run(engine: CpuEngine, streams: int, tokens: int, rng: random.Random) -> dict[str, float]:
    prompts = [tuple(rng.randrange(100, 49000) for _ in range(32)) for _ in range(streams)]
    firsts: list[float] = []
    lasts: list[float] = []

    async def one(i: int) -> int:
        n = 0
        request = EngineRequest(f"d{streams}-{i}", prompts[i], tokens, ignore_eos=True, sampling=GREEDY)
        async for chunk in engine.generate(request):
            if chunk.token_ids and n == 0:
                firsts.append(time.perf_counter())
            n += len(chunk.token_ids)
        lasts.append(time.perf_counter())
        return n

    started = time.perf_counter()
    produced = sum(await asyncio.gather(*(one(i) for i in range(streams))))
    ended = time.perf_counter()
    # Decode phase only: from the last stream's first token to the end, tokens after the first.
    decode_window = ended - max(firsts)
    decode_tokens = produced - streams
    return {
        "streams": streams,
        "tokens": produced,
        "wall_s": ended - started,
        "tokens_per_s": produced / (ended - started),
        "decode_tokens_per_s": decode_tokens / decode_window if decode_window > 0 else float("nan"),
    }


async def measure_decode(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(1)
    config = CpuEngineConfig(num_threads=args.threads, enable_prefix_caching=False)
    async with CpuEngine(config) as engine:
        await decode_run(engine, args.streams, 16, rng)  # warm-up
        one = await decode_run(engine, 1, args.decode_tokens, rng)
        many = await decode_run(engine, args.streams, args.decode_tokens, rng)
    return {
        "single": one,
        "concurrent": many,
        "speedup": many["tokens_per_s"] / one["tokens_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=default_num_threads())
    parser.add_argument("--prefix", type=int, default=1000, help="cached prompt tokens")
    parser.add_argument("--suffix", type=int, default=24, help="prompt tokens after the cached prefix")
    parser.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--skip-load", action="store_true", help="do not measure the GGUF conversion")
    args = parser.parse_args()

    load = {} if args.skip_load else measure_load(args.threads)
    ttft = asyncio.run(measure_ttft(args))
    decode = asyncio.run(measure_decode(args))

    print(f"CPU engine, SmolLM2-135M-Instruct float32, {args.threads} threads, torch {torch.__version__}")
    if load:
        print()
        print(f"{'load':<28} {'seconds':>8}")
        print(f"{'GGUF convert + load (cold)':<28} {load['cold_convert_and_load_s']:>8.2f}")
        print(f"{'converted weights (cached)':<28} {load['cached_load_s']:>8.2f}")
    print()
    print(f"{'TTFT, ' + str(ttft['prompt_tokens']) + '-token prompt':<28} {'seconds':>8}")
    print(f"{'cold':<28} {ttft['cold_ttft_s']:>8.3f}")
    print(f"{str(ttft['cached_prefix_tokens']) + ' tokens cached':<28} {ttft['cached_ttft_s']:>8.3f}")
    print(f"{'speedup (target >= 5x)':<28} {ttft['speedup']:>7.1f}x")
    print()
    print(f"{'decode':<12} {'streams':>8} {'tokens':>7} {'tok/s':>8} {'decode tok/s':>13}")
    for name, row in (("single", decode["single"]), ("concurrent", decode["concurrent"])):
        print(
            f"{name:<12} {row['streams']:>8} {row['tokens']:>7} {row['tokens_per_s']:>8.1f} "
            f"{row['decode_tokens_per_s']:>13.1f}"
        )
    print(f"{'throughput speedup (target >= 3x)':<37} {decode['speedup']:>7.1f}x")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
                "torch": torch.__version__,
                "load": load,
                "ttft": ttft,
                "decode": decode,
            },
            indent=2,
        )
        + "\n"
    )
    charts: list[plots.Bars | plots.Lines] = [
        plots.Bars(
            f"TTFT, {ttft['prompt_tokens']}-token prompt",
            "s",
            {
                "TTFT": {
                    "cold": ttft["cold_ttft_s"],
                    f"{ttft['cached_prefix_tokens']} cached": ttft["cached_ttft_s"],
                }
            },
        ),
        plots.Bars(
            "decode throughput",
            "tokens/s",
            {
                "all tokens": {name: decode[name]["tokens_per_s"] for name in ("single", "concurrent")},
                "decode tokens": {
                    name: decode[name]["decode_tokens_per_s"] for name in ("single", "concurrent")
                },
            },
        ),
    ]
    if load:
        charts.insert(
            0,
            plots.Bars(
                "model load",
                "s",
                {
                    "load": {
                        "cold (convert)": load["cold_convert_and_load_s"],
                        "cached": load["cached_load_s"],
                    }
                },
            ),
        )
    png = plots.save(RESULTS, plots.Chart(charts, title=f"CPU engine, {args.threads} threads"))
    print(f"\nwrote {RESULTS} and {png}")


if __name__ == "__main__":
    main()
