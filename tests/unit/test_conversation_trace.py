"""The multi-turn conversation trace: its shape, and the replay that bounds what a router can reach."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from bench.traces.conversations import SYSTEM_ID_SPAN, Shape, generate, read_trace, replay_hit_rate

pytestmark = pytest.mark.unit


def test_each_turn_resends_its_conversation_so_far() -> None:
    rows = generate(Shape(conversations=30), seed=3)
    assert [r["timestamp"] for r in rows] == sorted(r["timestamp"] for r in rows)  # type: ignore[type-var]
    by_session: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        by_session.setdefault(str(row["session_id"]), []).append(row)
    assert len(by_session) == 30
    for turns in by_session.values():
        assert [t["turn"] for t in turns] == list(range(len(turns)))
        first: list[int] = turns[0]["hash_ids"]  # type: ignore[assignment]
        assert first[0] % SYSTEM_ID_SPAN == 0 and first[0] < 6 * SYSTEM_ID_SPAN  # a system prompt opens it
        for earlier, later in itertools.pairwise(turns):
            before: list[int] = earlier["hash_ids"]  # type: ignore[assignment]
            after: list[int] = later["hash_ids"]  # type: ignore[assignment]
            assert after[: len(before)] == before and len(after) > len(before)


def _turn(session: str, blocks: list[int]) -> dict[str, object]:
    return {"session_id": session, "hash_ids": blocks}


def test_replay_pins_conversations_and_bounds_the_caches() -> None:
    # Three conversations, three turns each, interleaved; each turn adds two blocks to its history.
    rows = []
    history = {"a": [1, 2], "b": [101, 102], "c": [201, 202]}
    for _ in range(3):
        for s in ("a", "b", "c"):
            rows.append(_turn(s, list(history[s])))
            history[s] += [history[s][-1] + 1, history[s][-1] + 2]
    pinned = replay_hit_rate(rows, "affinity", workers=2, capacity=100, warmup=0)
    # Pinned, every later turn finds its whole previous prompt: (2 + 4) of (2 + 4 + 6) blocks.
    assert pinned == pytest.approx(6 / 12)
    # Round-robin over two workers moves a conversation every turn: a later turn never finds its
    # previous one (a: workers 0, 1, 0; its third turn finds the first's 2 blocks).
    spread = replay_hit_rate(rows, "round-robin", workers=2, capacity=100, warmup=0)
    assert spread < pinned
    tiny = replay_hit_rate(rows, "affinity", workers=2, capacity=3, warmup=0)
    assert tiny < pinned  # histories longer than the cache lose their oldest blocks
    assert replay_hit_rate(rows, "unbounded", workers=2, capacity=3, warmup=0) == pytest.approx(pinned)
    with pytest.raises(ValueError, match="placement"):
        replay_hit_rate(rows, "random")


def test_on_the_checked_in_trace_pinning_beats_round_robin() -> None:
    rows = generate(Shape(), seed=0)
    pinned = replay_hit_rate(rows, "affinity")
    assert replay_hit_rate(rows, "round-robin") < pinned < replay_hit_rate(rows, "unbounded")


def test_a_malformed_trace_is_refused_with_its_line(tmp_path: Path) -> None:
    good = '{"hash_ids": [1, 2], "session_id": "a"}\n'
    for bad, why in (
        ("not json\n", "not JSON"),
        ('{"hash_ids": "12", "session_id": "a"}\n', "hash_ids"),
        ('{"hash_ids": [1, "x"], "session_id": "a"}\n', "hash_ids"),
        ('{"hash_ids": [1]}\n', "session_id"),
        ("[1, 2]\n", "hash_ids"),
    ):
        path = tmp_path / "t.jsonl"
        path.write_text(good + "\n" + bad)
        with pytest.raises(ValueError, match=rf"t\.jsonl:3: .*{why}"):
            read_trace(path)
    path.write_text(good + good)
    assert len(read_trace(path)) == 2
