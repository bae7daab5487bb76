"""Router index and routing-decision speed: 64 workers, 1M indexed blocks, both index implementations.

For each implementation (each in a fresh process, so memory figures are its own):

* **updates**: the 1M blocks arrive as ``stored`` events of 32-block chains (half extending a
  prefix the worker already holds, as an engine reports new blocks after a prefix hit), then a
  quarter of them leave as ``removed`` events of leaf blocks; blocks per second for each. Then
  **churn** at capacity: 4000 new chains, each with the eviction of its worker's oldest root
  chain, whose descendants (chains later requests hung under it) go along, a harsher case than
  an engine's leaves-first eviction (run after the decisions, which it would leave without
  cached prefixes to find). Throughput is in CPU time of the process, so that it stays
  meaningful on a shared machine;
* **route decision**: the full in-process decision (:meth:`Scheduler.route`: sequence hashes,
  KV overlap in the index, active-block overlap, cost over 64 candidates, selection, recording
  the request) for prompts of 2000 tokens (31 blocks of 64) sharing system prompts, with about
  256 requests active; p50/p99/max over 20k decisions, and the index lookup alone. Every worker's
  cache is full (its KV capacity is what it holds, and the kv mode's forecast of what it keeps
  starts from what it stored), so every kv decision weighs evictions on all 64 candidates; every
  other decision runs the previous policy (kv-classic) on the same state, for comparison.

Prints a table and writes JSON to bench/results/router_index.json. Targets from the issue:
decision p99 <= 1 ms, updates >= 500k blocks/s.

    .venv/bin/python -m bench.router_index [--workers 64] [--blocks 1000000] [--decisions 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import plots
from tokenyard.common.discovery import Instance, ModelCard, WatchEventKind
from tokenyard.common.hashing import sequence_hashes
from tokenyard.router.active import ActiveRequests
from tokenyard.router.index import Prompt, WorkerRank, make_index
from tokenyard.router.index.tiers import TieredIndex
from tokenyard.router.scheduler import RouteHints, RouteQuery, Scheduler
from tokenyard.router.workers import WorkerSet

BLOCK_SIZE = 64
CHAIN = 32
SYSTEM_PROMPTS = 512
SYSTEM_BLOCKS = 16
PROMPT_TOKENS = 2000


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def percentile(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p * len(s)))]


Store = tuple[WorkerRank, int | None, list[int], list[int], int]


def build_events(
    rng: random.Random, workers: int, blocks: int
) -> tuple[list[list[int]], list[list[int]], list[Store]]:
    """System prompts, request paths, and the ``stored`` events an engine would publish for them.

    Each request is a system prompt (or an earlier request's prefix) plus a new 32-block tail; the
    engine reports only the blocks it did not hold, under the longest prefix it did.
    """
    systems = [[rng.getrandbits(64) for _ in range(SYSTEM_BLOCKS)] for _ in range(SYSTEM_PROMPTS)]
    per_worker = blocks // workers
    paths: list[list[int]] = []
    stores: list[Store] = []
    for w in range(1, workers + 1):
        rank = WorkerRank(w, 0)
        held: set[int] = set()
        mine: list[list[int]] = []
        while len(held) < per_worker:
            if mine and rng.random() < 0.5:
                base = rng.choice(mine)[: rng.randint(1, CHAIN)]
            else:
                base = systems[rng.randrange(SYSTEM_PROMPTS)]
            path = base + [rng.getrandbits(64) for _ in range(min(CHAIN, per_worker - len(held)))]
            seq = sequence_hashes(path)
            first_new = 0
            while first_new < len(seq) and seq[first_new] in held:
                first_new += 1
            new = seq[first_new:]
            if not new:
                continue
            held.update(new)
            parent = seq[first_new - 1] if first_new else None
            stores.append((rank, parent, new, path[first_new:], first_new))
            mine.append(path)
            paths.append(path)
    return systems, paths, stores


CHURN_EVENTS = 4000


def _churn_events(
    rng: random.Random, stores: list[Store], workers: int, count: int
) -> list[tuple[WorkerRank, list[int], tuple[list[int], list[int]]]]:
    """(rank, hashes to evict leaves first, (hashes, locals) of a new root chain) per event."""
    oldest: dict[WorkerRank, list[Store]] = {}
    for st in stores:
        if st[1] is None:  # chains stored from the root: evicting one never orphans another event's parent
            oldest.setdefault(st[0], []).append(st)
    out = []
    for i in range(count):
        rank = WorkerRank(1 + i % workers, 0)
        victims = oldest[rank]
        victim = victims.pop(0)
        locals_ = [rng.getrandbits(64) for _ in range(CHAIN)]
        seq = sequence_hashes(locals_)
        victims.append((rank, None, seq, locals_, 0))
        out.append((rank, victim[2][::-1], (seq, locals_)))
    return out


def run(kind: str, workers: int, blocks: int, decisions: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    systems, paths, stores = build_events(rng, workers, blocks)
    base_rss = rss_mib()
    index = make_index(kind)
    gc.collect()
    # Throughput in CPU time of this process: the figure stays meaningful on a busy machine.
    t0 = time.process_time()
    for rank, parent, hashes, tokens, start in stores:
        index.store(rank, parent, hashes, tokens, start)
    store_s = time.process_time() - t0
    indexed = index.num_blocks()
    build_rss = rss_mib() - base_rss

    # Removals: the newest quarter of the events' blocks, leaves first, eight per event (engines
    # evict leaves first).
    tail = stores[-len(stores) // 4 :]
    t0 = time.process_time()
    for rank, _parent, hashes, _tokens, _start in tail:
        backwards = hashes[::-1]
        for i in range(0, len(backwards), 8):
            index.remove(rank, backwards[i : i + 8])
    remove_s = time.process_time() - t0
    removed = indexed - index.num_blocks()
    for rank, parent, hashes, tokens, start in tail:
        index.store(rank, parent, hashes, tokens, start)
    assert index.num_blocks() == indexed

    ws = WorkerSet()
    # Each worker's KV capacity is what it holds: its cache is full, so the kv mode's forecast
    # evicts on every placement (the decision's most expensive case).
    card = ModelCard("m", "tok", BLOCK_SIZE, 8192, blocks // workers, "mocker", "aggregated")
    for w in range(1, workers + 1):
        ws.apply(
            WatchEventKind.ADDED,
            Instance(
                instance_id=w, service="worker", role="", address=f"127.0.0.1:{9000 + w}", model_card=card
            ),
        )
    tiered = TieredIndex(lambda: index)
    active = ActiveRequests()
    scheduler = Scheduler(ws, tiered, active, rng=random.Random(seed))
    # The forecast of what each worker keeps, as if this router had routed what they store.
    for rank, _parent, hashes, _tokens, _start in stores:
        scheduler.forecast.touch(rank, hashes)
    forecast_blocks = sum(scheduler.forecast.blocks(WorkerRank(w, 0)) for w in range(1, workers + 1))

    n_blocks = PROMPT_TOKENS // BLOCK_SIZE
    prompts = []
    for _ in range(decisions):
        # Half the prompts continue a cached request, half start from a system prompt.
        base = rng.choice(paths) if rng.random() < 0.5 else systems[rng.randrange(SYSTEM_PROMPTS)]
        base = base[: rng.randint(1, min(len(base), n_blocks))]
        prompts.append(base + [rng.getrandbits(64) for _ in range(n_blocks - len(base))])
    gc.collect()
    lookup: list[float] = []
    for p in prompts[:2000]:
        t0 = time.perf_counter()
        tiered.find_matches(Prompt(p))
        lookup.append(time.perf_counter() - t0)
    samples: list[float] = []
    cpu: list[float] = []
    # Every other decision in the previous kv policy, for the cost of the cache-pressure terms
    # measured in the same state of the same process.
    classic: list[float] = []
    classic_cpu: list[float] = []
    hints = (RouteHints(), RouteHints(mode="kv-classic"))
    hits = 0
    live: list[str] = []
    for i, p in enumerate(prompts):
        q = RouteQuery(f"r{i}", "m", p, PROMPT_TOKENS, hints=hints[i % 2])
        c0 = time.thread_time()
        t0 = time.perf_counter()
        d = scheduler.route(q)
        wall, used = time.perf_counter() - t0, time.thread_time() - c0
        (samples if i % 2 == 0 else classic).append(wall)
        (cpu if i % 2 == 0 else classic_cpu).append(used)
        # Prefill ends quickly next to decode: most active requests only hold blocks.
        scheduler.first_token(q.request_id)
        hits += d.overlap_blocks > 0
        live.append(q.request_id)
        if len(live) > 256:
            scheduler.finish(live.pop(0))
    # Churn last: it evicts whole system-prompt subtrees, which the decisions above hit.
    # Churn at capacity, as a full cache reports it: every new 32-block chain on a worker comes
    # with the eviction of that worker's oldest chain, leaves first.
    churn = _churn_events(rng, stores, workers, CHURN_EVENTS)
    before = index.num_blocks()
    t0 = time.process_time()
    for rank, evict, fresh in churn:
        for i in range(0, len(evict), 8):
            index.remove(rank, evict[i : i + 8])
        index.store(rank, None, fresh[0], fresh[1], 0)
    churn_s = time.process_time() - t0
    stored_new = sum(len(fresh[0]) for _, _, fresh in churn)
    # Evicting a chain takes its descendants along (chains other requests extended): count them.
    moved = stored_new + (before + stored_new - index.num_blocks())

    ms = 1e3
    return {
        "index": kind,
        "workers": workers,
        "indexed_blocks": indexed,
        "store_events": len(stores),
        "store_blocks_per_s": indexed / store_s,
        "remove_blocks_per_s": removed / remove_s,
        "churn_blocks_per_s": moved / churn_s,
        "index_rss_mib": build_rss,
        "prompt_blocks": n_blocks,
        "lookup_p50_ms": percentile(lookup, 0.5) * ms,
        "lookup_p99_ms": percentile(lookup, 0.99) * ms,
        "decision_p50_ms": percentile(samples, 0.5) * ms,
        "decision_p99_ms": percentile(samples, 0.99) * ms,
        "decision_max_ms": max(samples) * ms,
        "decision_mean_ms": statistics.fmean(samples) * ms,
        # CPU time of the deciding thread: what the decision costs without other processes'
        # preemptions (the wall-clock figures include them on a shared machine).
        "decision_cpu_p50_ms": percentile(cpu, 0.5) * ms,
        "decision_cpu_p99_ms": percentile(cpu, 0.99) * ms,
        "classic_decision_p50_ms": percentile(classic, 0.5) * ms,
        "classic_decision_p99_ms": percentile(classic, 0.99) * ms,
        "classic_decision_cpu_p50_ms": percentile(classic_cpu, 0.5) * ms,
        "classic_decision_cpu_p99_ms": percentile(classic_cpu, 0.99) * ms,
        "gc_collections": [g["collections"] for g in gc.get_stats()],
        "decisions_with_overlap": hits / len(samples),
        "forecast_blocks": forecast_blocks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", choices=["positional", "radix"], help="run one implementation in this process"
    )
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run(args.only, args.workers, args.blocks, args.decisions, args.seed)))
        return
    rows = []
    for kind in ("positional", "radix"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.router_index",
                "--only",
                kind,
                "--workers",
                str(args.workers),
                "--blocks",
                str(args.blocks),
                "--decisions",
                str(args.decisions),
                "--seed",
                str(args.seed),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"{args.workers} workers, {rows[0]['indexed_blocks']:,} indexed blocks, prompts of {rows[0]['prompt_blocks']} blocks"
    )
    header = (
        f"{'index':>11} {'store blk/s':>12} {'remove blk/s':>13} {'churn blk/s':>12} {'RSS MiB':>8} {'lookup p99':>11} "
        f"{'decide p50':>11} {'decide p99':>11} {'max':>7} {'cpu p50':>9} {'cpu p99':>9} "
        f"{'classic cpu p50/p99':>20}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['index']:>11} {r['store_blocks_per_s']:>12,.0f} {r['remove_blocks_per_s']:>13,.0f} "
            f"{r['churn_blocks_per_s']:>12,.0f} "
            f"{r['index_rss_mib']:>8.0f} {r['lookup_p99_ms']:>9.3f}ms {r['decision_p50_ms']:>9.3f}ms "
            f"{r['decision_p99_ms']:>9.3f}ms {r['decision_max_ms']:>5.1f}ms {r['decision_cpu_p50_ms']:>7.3f}ms "
            f"{r['decision_cpu_p99_ms']:>7.3f}ms {r['classic_decision_cpu_p50_ms']:>9.3f}/{r['classic_decision_cpu_p99_ms']:.3f}ms"
        )
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "router_index.json").write_text(json.dumps({"rows": rows}, indent=2))
    plots.save(
        out_dir / "router_index.json",
        plots.Chart(
            [
                plots.Bars(
                    "index updates",
                    "blocks/s",
                    {
                        r["index"]: {
                            "store": r["store_blocks_per_s"],
                            "remove": r["remove_blocks_per_s"],
                            "churn": r["churn_blocks_per_s"],
                        }
                        for r in rows
                    },
                ),
                plots.Bars(
                    "routing decision",
                    "ms",
                    {
                        r["index"]: {
                            "lookup p99": r["lookup_p99_ms"],
                            "p50": r["decision_p50_ms"],
                            "p99": r["decision_p99_ms"],
                            "cpu p99": r["decision_cpu_p99_ms"],
                        }
                        for r in rows
                    },
                ),
                plots.Bars("index memory", "MiB", {r["index"]: {"RSS": r["index_rss_mib"]} for r in rows}),
            ],
            title="router index",
        ),
    )


if __name__ == "__main__":
    main()
