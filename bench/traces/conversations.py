"""A multi-turn conversation trace in Mooncake's format, for KV routing benchmarks.

What a chat service sees: conversations start at random (Poisson arrivals); each opens with one
of a few shared system prompts (long, reused by every conversation of that assistant), and each
turn's prompt is the whole history so far (system prompt, every earlier user message and reply)
plus the new user message. Users think between turns. The blocks a turn shares with the previous
turn of its conversation, and with every conversation of the same system prompt, are what a KV
router can reuse; the history of a conversation lives on one worker unless the router moves it.

One JSON row per turn, in time order::

    {"timestamp": 1834, "input_length": 2413, "output_length": 96,
     "hash_ids": [0, 1, ..., 23, 5012, 5013, ...], "session_id": "c17", "turn": 2}

``hash_ids`` name the prompt's blocks of ``--block-size`` tokens (64: the mocker's); ids below
``SYSTEM_ID_SPAN * system prompts`` are system-prompt blocks, the rest belong to one conversation.
A reply's blocks enter the next turn's prompt, as a chat client resends the assistant's answer
(the engine generated different tokens for it, so they are new to its cache: like a real reply
that is re-tokenized). ``input_length`` cuts the last block short, as real prompts are.

    .venv/bin/python -m bench.traces.conversations                # writes bench/traces/conversations.jsonl
    .venv/bin/python -m bench.traces.conversations --conversations 400 --seed 2 --output /tmp/c.jsonl
    .venv/bin/python -m bench.traces.conversations --ceiling      # what 4 caches of 256 blocks can keep

Replay it with the load generator (``--trace``; the session ids go out as routing hints), or
through ``python -m bench.router_kv_vs_rr --workload conversations``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

OUTPUT = Path(__file__).parent / "conversations.jsonl"
# Hash ids reserved per system prompt (its blocks are numbered from i * SYSTEM_ID_SPAN).
SYSTEM_ID_SPAN = 1000


@dataclass(frozen=True)
class Shape:
    conversations: int = 200
    system_prompts: int = 6
    system_tokens: tuple[int, int] = (1000, 2500)
    turns: tuple[int, int] = (2, 8)
    user_tokens: tuple[int, int] = (40, 400)
    output_tokens: tuple[int, int] = (30, 200)
    # Mean seconds between conversation starts, and a user's think time between turns.
    arrival_gap_s: float = 0.25
    think_s: tuple[float, float] = (1.0, 8.0)
    block_size: int = 64


def generate(shape: Shape, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    bs = shape.block_size
    system_blocks = [
        list(range(i * SYSTEM_ID_SPAN, i * SYSTEM_ID_SPAN + rng.randint(*shape.system_tokens) // bs))
        for i in range(shape.system_prompts)
    ]
    next_id = shape.system_prompts * SYSTEM_ID_SPAN
    rows: list[dict[str, object]] = []
    start = 0.0
    for c in range(shape.conversations):
        start += rng.expovariate(1.0 / shape.arrival_gap_s)
        # A few assistants are far more popular than the rest (Zipf-like).
        system = min(int(rng.paretovariate(1.2)) - 1, shape.system_prompts - 1)
        history = list(system_blocks[system])
        t = start
        for turn in range(rng.randint(*shape.turns)):
            user = -(-rng.randint(*shape.user_tokens) // bs)
            history += range(next_id, next_id + user)
            next_id += user
            output = rng.randint(*shape.output_tokens)
            rows.append(
                {
                    "timestamp": round(t * 1000),
                    # The last block is partial: a prompt rarely ends on a block boundary.
                    "input_length": len(history) * bs - rng.randrange(bs),
                    "output_length": output,
                    "hash_ids": list(history),
                    "session_id": f"c{c}",
                    "turn": turn,
                }
            )
            # The reply joins the history; the user reads it and thinks before the next turn.
            reply = -(-output // bs)
            history += range(next_id, next_id + reply)
            next_id += reply
            t += rng.uniform(*shape.think_s)
    rows.sort(key=lambda r: (int(r["timestamp"]), str(r["session_id"])))  # type: ignore[call-overload]
    return rows


def read_trace(path: Path) -> list[dict[str, object]]:
    """The rows of a trace file; ValueError naming the line that is not a turn."""
    rows: list[dict[str, object]] = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("hash_ids"), list)
                or not all(isinstance(h, int) for h in row["hash_ids"])
                or not isinstance(row.get("session_id"), str)
            ):
                raise ValueError(f"{path}:{number}: a turn needs hash_ids (integers) and a session_id")
            rows.append(row)
    return rows


def replay_hit_rate(
    rows: list[dict[str, object]],
    placement: str,
    *,
    workers: int = 4,
    capacity: int = 256,
    warmup: int = 32,
    limit: int = 432,
) -> float:
    """The prompt cache hit rate of replaying ``rows`` one at a time (no concurrency) through
    ``workers`` LRU caches of ``capacity`` blocks each: a ceiling for what a router can reach on
    this trace with those caches (the bench replays 32 warm-up turns and 400 measured ones).

    ``placement``: ``affinity`` (a conversation's first turn goes where most of its prefix is
    cached, ties to the emptier cache; its later turns follow it), ``round-robin``, or
    ``unbounded`` (affinity, caches without a bound)."""
    if placement not in ("affinity", "round-robin", "unbounded"):
        raise ValueError(f"unknown placement {placement!r}")
    bound = 2**62 if placement == "unbounded" else capacity
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(workers)]
    homes: dict[str, int] = {}
    hits = total = 0

    def cached_prefix(cache: OrderedDict[int, None], blocks: list[int]) -> int:
        n = 0
        for b in blocks:
            if b not in cache:
                break
            n += 1
        return n

    for i, row in enumerate(rows[:limit]):
        blocks: list[int] = row["hash_ids"]  # type: ignore[assignment]
        if placement == "round-robin":
            w = i % workers
        else:
            session = str(row["session_id"])
            if session not in homes:
                homes[session] = max(
                    range(workers), key=lambda k: (cached_prefix(caches[k], blocks), -len(caches[k]))
                )
            w = homes[session]
        cache = caches[w]
        if i >= warmup:
            hits += cached_prefix(cache, blocks)
            total += len(blocks)
        for b in blocks:
            cache[b] = None
            cache.move_to_end(b)
        while len(cache) > bound:
            cache.popitem(last=False)
    return hits / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=Shape.conversations)
    parser.add_argument("--system-prompts", type=int, default=Shape.system_prompts)
    parser.add_argument("--block-size", type=int, default=Shape.block_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="print the hit rates of replaying --output one turn at a time through 4 caches of 256 "
        "blocks (conversations pinned, round-robin, unbounded caches) instead of writing it",
    )
    args = parser.parse_args()
    if args.ceiling:
        try:
            trace = read_trace(args.output)
        except (OSError, ValueError) as exc:
            parser.error(f"--ceiling: {exc}")
        for placement in ("affinity", "round-robin", "unbounded"):
            print(f"{placement:<12} hit rate {replay_hit_rate(trace, placement):.2f}")
        return
    if args.conversations < 1 or args.system_prompts < 1 or args.block_size < 1:
        parser.error("--conversations, --system-prompts and --block-size must be at least 1")
    shape = Shape(
        conversations=args.conversations, system_prompts=args.system_prompts, block_size=args.block_size
    )
    rows = generate(shape, args.seed)
    with args.output.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    turns = len(rows)
    tokens = sum(int(r["input_length"]) for r in rows)  # type: ignore[call-overload]
    print(
        f"{args.output}: {args.conversations} conversations, {turns} turns, {tokens / turns:.0f} prompt tokens per turn"
    )


if __name__ == "__main__":
    main()
