"""Does the simulated engine spend the time its model says? Single-request TTFT and ITL at speedup 1.

Each case streams one request through the asyncio engine (real sleeping) and compares the
measured time to first token and mean inter-token latency with the reference mocker's formulas,
evaluated here independently of the engine's code:

* TTFT = prefill(new prompt tokens) + decode(first step), since the step that finishes a prompt
  also emits its first token;
* ITL = mean of decode(step) over the later steps, where decode depends on KV utilisation
  (blocks the request holds * block_size / all KV tokens).

Prompts of 100 to 4000 tokens, cold, with half of the prompt cached, and with all but the last
block cached (a repeated prompt). Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import plots
from tokenyard.worker.engines.base import EngineRequest
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.engine import MockerEngine

ISLS = (100, 500, 1000, 2000, 4000)
OUTPUT_TOKENS = 32
REPEATS = 3
TARGET_ERROR_PCT = 10.0
CONFIG = MockerConfig(speedup_ratio=1.0)


@dataclass(frozen=True)
class Row:
    isl: int
    mode: str
    cached_tokens: int
    ttft_ms: float
    expected_ttft_ms: float
    itl_ms: float
    expected_itl_ms: float

    @property
    def ttft_error_pct(self) -> float:
        return 100 * (self.ttft_ms - self.expected_ttft_ms) / self.expected_ttft_ms

    @property
    def itl_error_pct(self) -> float:
        return 100 * (self.itl_ms - self.expected_itl_ms) / self.expected_itl_ms


def prefill_ms(new_tokens: int) -> float:
    if new_tokens <= 0:
        return 0.0
    return 4.209989e-07 * new_tokens**2 + 1.518344e-02 * new_tokens + 16.50142


def decode_ms(held_tokens: int) -> float:
    usage = min(1.0, held_tokens / (CONFIG.num_gpu_blocks * CONFIG.block_size))
    return max(1.0, -25.74 * usage**2 + 54.01 * usage + 5.74)


def held(tokens: int) -> int:
    """KV tokens a request holds once ``tokens`` tokens are computed (whole blocks)."""
    return math.ceil(tokens / CONFIG.block_size) * CONFIG.block_size


def expected(isl: int, cached: int) -> tuple[float, float]:
    ttft = prefill_ms(isl - cached) + decode_ms(held(isl))
    # Decode step j computes the j-th generated token: isl + j tokens are then in the cache.
    itl = statistics.fmean(decode_ms(held(isl + j)) for j in range(1, OUTPUT_TOKENS))
    return ttft, itl


async def measure(engine: MockerEngine, request: EngineRequest) -> tuple[float, float, int]:
    """(TTFT ms, mean ITL ms, cached tokens) of one streamed request."""
    start = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    cached = 0
    async for chunk in engine.generate(request):
        stamps.append((time.perf_counter(), len(chunk.token_ids)))
        if chunk.usage is not None:
            cached = chunk.usage.cached_tokens
    first = stamps[0][0]
    tokens_after_first = sum(n for _, n in stamps) - stamps[0][1]
    itl = (stamps[-1][0] - first) / tokens_after_first if tokens_after_first else float("nan")
    return (first - start) * 1e3, itl * 1e3, cached


async def run_case(engine: MockerEngine, isl: int, mode: str, base: int) -> Row:
    ttfts: list[float] = []
    itls: list[float] = []
    cached = 0
    for repeat in range(REPEATS):
        offset = base + repeat * 10_000
        prompt = list(range(offset, offset + isl))
        if mode == "half":
            warm = prompt[: isl // 2]
        elif mode == "all-but-last-block":
            warm = prompt
        else:
            warm = []
        if warm:
            async for _ in engine.generate(
                EngineRequest(f"warm-{isl}-{mode}-{repeat}", tuple(warm), max_tokens=1)
            ):
                pass
        request = EngineRequest(f"req-{isl}-{mode}-{repeat}", tuple(prompt), max_tokens=OUTPUT_TOKENS)
        ttft, itl, cached = await measure(engine, request)
        ttfts.append(ttft)
        itls.append(itl)
    want_ttft, want_itl = expected(isl, cached)
    return Row(isl, mode, cached, statistics.median(ttfts), want_ttft, statistics.median(itls), want_itl)


async def main() -> None:
    rows: list[Row] = []
    print(
        f"{'isl':>5} {'cache':>19} {'cached':>6} {'ttft ms':>8} {'expect':>8} {'err %':>6}"
        f" {'itl ms':>7} {'expect':>7} {'err %':>6}"
    )
    started = time.perf_counter()
    async with MockerEngine(CONFIG) as engine:
        base = 0
        for isl in ISLS:
            for mode in ("cold", "half", "all-but-last-block"):
                base += 100_000
                row = await run_case(engine, isl, mode, base)
                rows.append(row)
                print(
                    f"{isl:>5} {mode:>19} {row.cached_tokens:>6} {row.ttft_ms:>8.2f} {row.expected_ttft_ms:>8.2f}"
                    f" {row.ttft_error_pct:>+6.1f} {row.itl_ms:>7.3f} {row.expected_itl_ms:>7.3f}"
                    f" {row.itl_error_pct:>+6.1f}"
                )
    worst = max(max(abs(r.ttft_error_pct), abs(r.itl_error_pct)) for r in rows)
    verdict = "within" if worst <= TARGET_ERROR_PCT else "OUTSIDE"
    print(
        f"worst error {worst:.1f}% ({verdict} the {TARGET_ERROR_PCT:.0f}% target), {time.perf_counter() - started:.1f} s"
    )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    summary = {
        "config": CONFIG.model_dump(mode="json"),
        "output_tokens": OUTPUT_TOKENS,
        "repeats": REPEATS,
        "worst_error_pct": worst,
        "rows": [
            {**asdict(r), "ttft_error_pct": r.ttft_error_pct, "itl_error_pct": r.itl_error_pct} for r in rows
        ],
    }
    (out / "mocker_calibration.json").write_text(json.dumps(summary, indent=2))
    modes = list(dict.fromkeys(r.mode for r in rows))

    def lines(measured: str, model: str) -> dict[str, list[tuple[float, float]]]:
        series: dict[str, list[tuple[float, float]]] = {}
        for mode in modes:
            of_mode = [r for r in rows if r.mode == mode]
            series[f"{mode}"] = [(r.isl, getattr(r, measured)) for r in of_mode]
            series[f"{mode} (model)"] = [(r.isl, getattr(r, model)) for r in of_mode]
        return series

    dashed = {f"{mode} (model)": "--" for mode in modes}
    plots.save(
        out / "mocker_calibration.json",
        plots.Chart(
            [
                plots.Lines(
                    "TTFT",
                    "prompt tokens",
                    "ms",
                    lines("ttft_ms", "expected_ttft_ms"),
                    logx=True,
                    styles=dashed,
                ),
                plots.Lines(
                    "ITL", "prompt tokens", "ms", lines("itl_ms", "expected_itl_ms"), logx=True, styles=dashed
                ),
            ],
            title=f"mocker against its performance model (worst error {worst:.1f}%)",
        ),
    )


if __name__ == "__main__":
    asyncio.run(main())
