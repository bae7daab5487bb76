"""The TTFT floor of the cache-pressure workload: what the simulated engine allows with perfect
placement and no serving cost at all.

A discrete-event simulation of the mocker workers of ``bench.router_kv_vs_rr`` (4 ranks of 256
blocks of 64 tokens, the reference timing model, the shared scheduler and block pool stepped by
hand with the mocker's own step model), fed by 16 closed-loop clients with the cache-pressure
workload (16 shared 2000-token prefixes, 100 tokens of their own, 50 out). No network, no
frontend, no router, no Python scheduling delay: a request reaches its worker ``--send-latency-ms``
(0.5) after its client sends it, and a finished request's client sends the next one at once. That
half millisecond matters: a request that reaches a worker exactly as a step ends would join the
next step at once, which never happens in the engine (it plans the next step before any other
task runs), and makes the floor look 7 ms lower than it is. With it, the floor agrees with the
engine itself run in one process (``MockerEngine`` driven by 16 tasks with the same placement:
55 ms).

Placements:

* ``partition``: every prefix has one home worker (prefix id mod 4): each prefix is computed
  once per worker at most, nothing is evicted, every later request is a hit. No router can
  place better for the hit rate;
* ``partition-least-loaded``: each prefix has two homes and a request goes to the one with
  fewer requests in it (a hot prefix replicated on purpose);
* ``round-robin``.

Reports TTFT p50/p90 and the prompt cache hit rate per placement (the same warm-up of 32 requests
is left out as in the end-to-end bench). The end-to-end figures can only be above these.

    .venv/bin/python -m bench.router_floor [--requests 400] [--seeds 5]
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenyard.worker.engines.base import EngineRequest
from tokenyard.worker.engines.core.scheduler import Scheduler
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.executor import MockerExecutor, rank_by_hand

WORKERS = 4
KV_BLOCKS = 256
CLIENTS = 16
PREFIXES = 16
PREFIX_LEN = 2000
SUFFIX_LEN = 100
OUTPUT_LEN = 50
WARMUP = 32


@dataclass
class Rank:
    scheduler: Scheduler
    executor: MockerExecutor
    busy_until: float = 0.0
    stepping: bool = False


@dataclass
class Pending:
    client: int
    sent: float
    first_token: float | None = None


@dataclass
class Sim:
    placement: str
    rng: random.Random
    send_latency_s: float = 0.0005
    ranks: list[Rank] = field(default_factory=list)
    pending: dict[str, Pending] = field(default_factory=dict)
    events: list[tuple[float, int, str, int]] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    sent: int = 0
    done: int = 0
    _seq: int = 0
    _rr: int = 0

    def __post_init__(self) -> None:
        cfg = MockerConfig(num_gpu_blocks=KV_BLOCKS, speedup_ratio=1.0)
        for _ in range(WORKERS):
            self.ranks.append(Rank(*rank_by_hand(cfg)))

    def _push(self, at: float, kind: str, who: int) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, kind, who))

    def _place(self, prefix: int) -> int:
        if self.placement == "partition":
            return prefix % WORKERS
        if self.placement == "partition-least-loaded":
            homes = (prefix % WORKERS, (prefix + 1) % WORKERS)
            return min(
                homes,
                key=lambda r: len(self.ranks[r].scheduler.running) + len(self.ranks[r].scheduler.waiting),
            )
        self._rr += 1
        return self._rr % WORKERS

    def _send(self, now: float, client: int) -> None:
        prefix = self.rng.randrange(PREFIXES)
        self.sent += 1
        request_id = f"r{self.sent}"
        tokens = tuple(prefix * 1_000_000 + i for i in range(PREFIX_LEN)) + tuple(
            500_000_000 + self.sent * 1000 + i for i in range(SUFFIX_LEN)
        )
        rank = self.ranks[self._place(prefix)]
        request = EngineRequest(request_id, tokens, max_tokens=OUTPUT_LEN, ignore_eos=True)
        rank.scheduler.add(request, rank.executor.sampler(request))
        self.pending[request_id] = Pending(client, now)
        if not rank.stepping:
            self._push(now, "step", self.ranks.index(rank))

    def _step(self, now: float, index: int) -> None:
        rank = self.ranks[index]
        if not rank.scheduler.has_work:
            rank.stepping = False
            return
        rank.stepping = True
        plan = rank.scheduler.schedule()
        modelled = rank.executor.model(rank.scheduler.pool, plan)
        end = now + rank.executor.step_seconds(modelled)
        outputs = rank.scheduler.finish_step(plan, modelled.tokens)
        for out in outputs:
            p = self.pending.get(out.seq.request_id)
            if p is None:
                continue
            if p.first_token is None:
                p.first_token = end
                if self.done >= WARMUP:
                    self.ttfts.append(end - p.sent)
                    self.prompt_tokens += out.seq.prompt_len
                    self.cached_tokens += out.seq.cached_tokens or 0
            if out.finish_reason is not None:
                del self.pending[out.seq.request_id]
                self.done += 1
                # The next request reaches a worker after the step that ended this one has
                # begun: in the engine the next step is planned before any other task runs.
                self._push(end + self.send_latency_s, "send", p.client)
        self._push(end, "step", index)

    def run(self, requests: int) -> dict[str, float]:
        for client in range(CLIENTS):
            self._push(0.0, "send", client)
        while self.events and len(self.ttfts) < requests:
            now, _, kind, who = heapq.heappop(self.events)
            if kind == "send":
                self._send(now, who)
            else:
                self._step(now, who)
        ms = sorted(t * 1000 for t in self.ttfts)
        return {
            "ttft_p50_ms": statistics.median(ms),
            "ttft_p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "cache_hit_rate": self.cached_tokens / max(1, self.prompt_tokens),
        }


PLACEMENTS: dict[str, Callable[[random.Random], Sim]] = {
    name: (lambda rng, name=name: Sim(name, rng))  # type: ignore[misc]
    for name in ("partition", "partition-least-loaded", "round-robin")
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=5, help="workload seeds; medians are reported")
    parser.add_argument(
        "--send-latency-ms", type=float, default=0.5, help="from a client's send to its worker"
    )
    args = parser.parse_args()
    print(f"{'placement':<24} {'TTFT p50':>9} {'TTFT p90':>9} {'hit rate':>9}")
    for name, make in PLACEMENTS.items():
        runs = []
        for seed in range(args.seeds):
            sim = make(random.Random(seed))
            sim.send_latency_s = args.send_latency_ms / 1000
            runs.append(sim.run(args.requests))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{name:<24} {med['ttft_p50_ms']:>7.1f}ms {med['ttft_p90_ms']:>7.1f}ms {med['cache_hit_rate']:>9.2f}"
        )


if __name__ == "__main__":
    main()
