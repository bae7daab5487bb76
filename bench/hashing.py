"""How much hashing a prompt costs: block hashes of 1k to 32k-token prompts.

Compares the shipped implementation (one numpy pack, one C call per block) with a naive
pure-Python one (``int.to_bytes`` per token), in the same run. Prints a table and writes JSON to
bench/results/hashing.json.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from bench import plots
from tokenyard.common.hashing import block_hashes

BLOCK_SIZE = 64


def naive(tokens: list[int], block_size: int) -> list[int]:
    out: list[int] = []
    for i in range(len(tokens) // block_size):
        data = b"".join(t.to_bytes(4, "little") for t in tokens[i * block_size : (i + 1) * block_size])
        local = xxhash.xxh3_64_intdigest(data, seed=1337)
        out.append(
            local
            if not out
            else xxhash.xxh3_64_intdigest(
                out[-1].to_bytes(8, "little") + local.to_bytes(8, "little"), seed=1337
            )
        )
    return out


def timeit(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    rng = random.Random(0)
    rows = []
    print(f"{'tokens':>8} {'blocks':>7} {'tokenyard µs':>13} {'naive µs':>10} {'speedup':>8} {'µs/block':>9}")
    for n in (1024, 2048, 4096, 8192, 16384, 32768):
        tokens = [rng.randrange(0, 49152) for _ in range(n)]
        assert block_hashes(tokens, BLOCK_SIZE)[1] == naive(tokens, BLOCK_SIZE)
        ours = timeit(lambda t=tokens: block_hashes(t, BLOCK_SIZE), 200)  # type: ignore[misc]
        base = timeit(lambda t=tokens: naive(t, BLOCK_SIZE), 20)  # type: ignore[misc]
        blocks = n // BLOCK_SIZE
        rows.append(
            {
                "tokens": n,
                "blocks": blocks,
                "tokenyard_us": ours * 1e6,
                "naive_us": base * 1e6,
                "speedup": base / ours,
            }
        )
        print(
            f"{n:>8} {blocks:>7} {ours * 1e6:>13.1f} {base * 1e6:>10.1f} {base / ours:>7.1f}x {ours * 1e6 / blocks:>9.2f}"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "hashing.json").write_text(json.dumps({"block_size": BLOCK_SIZE, "rows": rows}, indent=2))
    times = {
        label: [(float(r["tokens"]), float(r[key])) for r in rows]
        for label, key in (("tokenyard", "tokenyard_us"), ("naive", "naive_us"))
    }
    plots.save(
        out / "hashing.json",
        plots.Chart(
            [
                plots.Lines("block hashes of a prompt", "prompt tokens", "µs", times, logx=True, logy=True),
                plots.Lines(
                    "speedup over naive",
                    "prompt tokens",
                    "times faster",
                    {"speedup": [(r["tokens"], r["speedup"]) for r in rows]},
                    logx=True,
                ),
            ],
            title=f"block hashing (block size {BLOCK_SIZE})",
        ),
    )


if __name__ == "__main__":
    main()
