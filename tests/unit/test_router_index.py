"""KV index semantics, for both implementations, and the positional index against the radix oracle.

The event streams are built to hit the positional design's pitfalls: different prefixes that
share (position, local hash), removals in the middle of a chain (the rank's bit must leave every
descendant, or a later probe over-counts), chains longer than a jump, slot reuse after a worker
leaves, and events the index must reject whole (unknown parent, wrong position, a block hash
naming two blocks).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tokenyard.common.hashing import sequence_hashes
from tokenyard.router.index import Chain, InvalidEvent, KvIndex, Prompt, WorkerRank, make_index
from tokenyard.router.index.positional import PositionalIndex
from tokenyard.router.index.radix import RadixIndex

pytestmark = pytest.mark.unit

A, B, C = WorkerRank(1, 0), WorkerRank(2, 0), WorkerRank(3, 0)

FACTORIES: dict[str, Callable[[], KvIndex]] = {
    "radix": RadixIndex,
    "positional": lambda: PositionalIndex(jump=2),
    "positional-jump32": lambda: PositionalIndex(jump=32),
}


@pytest.fixture(params=list(FACTORIES))
def index(request: pytest.FixtureRequest) -> KvIndex:
    return FACTORIES[request.param]()


def chain(locals_: list[int], parent: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(block hashes, local hashes) of blocks ``locals_`` after prefix ``parent`` (honest hashes)."""
    prefix = parent or []
    seq = sequence_hashes(prefix + locals_)
    return seq[len(prefix) :], locals_


def store(index: KvIndex, rank: WorkerRank, locals_: list[int], parent: list[int] | None = None) -> list[int]:
    blocks, tokens = chain(locals_, parent)
    parent_hash = sequence_hashes(parent)[-1] if parent else None
    index.store(rank, parent_hash, blocks, tokens, len(parent or []))
    return blocks


def matches(index: KvIndex, locals_: list[int], early_exit: bool = False) -> dict[WorkerRank, int]:
    return index.find_matches(Prompt(locals_), early_exit)


def test_overlap_is_the_leading_run(index: KvIndex) -> None:
    store(index, A, [1, 2, 3, 4])
    store(index, B, [1, 2, 9])
    store(index, C, [7])
    assert matches(index, [1, 2, 3, 4, 5]) == {A: 4, B: 2}
    assert matches(index, [1, 2, 9]) == {A: 2, B: 3}
    assert matches(index, [7, 1]) == {C: 1}
    assert matches(index, [2, 3]) == {}
    assert matches(index, []) == {}


def test_store_extends_a_held_parent(index: KvIndex) -> None:
    store(index, A, [1, 2])
    store(index, A, [3, 4], parent=[1, 2])
    assert matches(index, [1, 2, 3, 4]) == {A: 4}
    assert index.num_blocks(A) == 4


def test_unknown_parent_is_rejected_whole(index: KvIndex) -> None:
    store(index, A, [1])
    with pytest.raises(InvalidEvent) as err:
        store(index, B, [2], parent=[1])
    assert err.value.reason == InvalidEvent.UNKNOWN_PARENT
    assert index.num_blocks(B) == 0 and index.ranks() == [A]


def test_wrong_start_position_is_rejected(index: KvIndex) -> None:
    blocks = store(index, A, [1, 2])
    with pytest.raises(InvalidEvent) as err:
        index.store(A, blocks[-1], [99], [3], start_position=5)
    assert err.value.reason == InvalidEvent.BAD_POSITION
    assert index.num_blocks(A) == 2


def test_block_hash_naming_two_blocks_is_rejected(index: KvIndex) -> None:
    blocks = store(index, A, [1, 2])
    with pytest.raises(InvalidEvent) as err:
        index.store(A, None, [blocks[0]], [5])
    assert err.value.reason == InvalidEvent.CONFLICT
    with pytest.raises(InvalidEvent) as err:
        index.store(A, None, [12345], [1])  # block 1 is already held under another hash
    assert err.value.reason == InvalidEvent.CONFLICT
    with pytest.raises(InvalidEvent) as err:
        index.store(A, None, [7, 7], [8, 9])
    assert err.value.reason == InvalidEvent.DUPLICATE_BLOCK
    with pytest.raises(InvalidEvent) as err:
        index.store(A, None, [7, 8], [8])
    assert err.value.reason == InvalidEvent.MALFORMED
    assert matches(index, [1, 2]) == {A: 2} and index.num_blocks(A) == 2


def test_restoring_held_blocks_is_idempotent(index: KvIndex) -> None:
    store(index, A, [1, 2, 3])
    store(index, A, [1, 2, 3])
    assert index.num_blocks(A) == 3 and matches(index, [1, 2, 3]) == {A: 3}


def test_removal_takes_descendants(index: KvIndex) -> None:
    blocks = store(index, A, [1, 2, 3, 4, 5, 6])
    store(index, B, [1, 2, 3, 4, 5, 6])
    assert index.remove(A, [blocks[2], 999]) == 1
    assert matches(index, [1, 2, 3, 4, 5, 6]) == {A: 2, B: 6}
    assert index.num_blocks(A) == 2
    # Storing the middle block again does not resurrect the old descendants.
    store(index, A, [3], parent=[1, 2])
    assert matches(index, [1, 2, 3, 4, 5, 6]) == {A: 3, B: 6}


def test_clear_and_remove_worker(index: KvIndex) -> None:
    r1 = WorkerRank(9, 1)
    store(index, A, [1, 2])
    store(index, B, [1, 2])
    store(index, r1, [1])
    store(index, WorkerRank(9, 0), [1])
    index.clear(A)
    assert matches(index, [1, 2]) == {B: 2, r1: 1, WorkerRank(9, 0): 1}
    index.remove_worker(9)
    assert matches(index, [1, 2]) == {B: 2}
    assert sorted(index.ranks()) == [B]
    assert index.num_blocks() == 2


def test_early_exit_stops_at_a_single_candidate(index: KvIndex) -> None:
    store(index, A, [1, 2, 3, 4, 5])
    store(index, B, [1, 2])
    assert matches(index, [1, 2, 3, 4, 5], early_exit=True) == {A: 3, B: 2}
    assert matches(index, [1, 2, 3, 4, 5]) == {A: 5, B: 2}


def test_dump_reproduces_the_rank(index: KvIndex) -> None:
    store(index, A, [1, 2, 3])
    store(index, A, [4, 5], parent=[1, 2])
    store(index, A, [6], parent=[1])
    store(index, A, [8])
    store(index, B, [1, 2, 3])
    copy = make_index("radix")
    for c in index.dump(A):
        copy.store(A, c.parent_hash, c.block_hashes, c.tokens_hashes)
    assert as_set(copy.dump(A)) == as_set(index.dump(A))
    assert len(as_set(index.dump(A))) == 7


def test_slots_are_reused_after_a_worker_leaves() -> None:
    index = PositionalIndex(jump=1)
    for w in range(70):
        store(index, WorkerRank(w, 0), [1, 2, w + 100])
    for w in range(0, 70, 2):
        index.remove_worker(w)
    store(index, WorkerRank(500, 0), [1, 2, 3])
    expected = {WorkerRank(w, 0): 2 for w in range(1, 70, 2)} | {WorkerRank(500, 0): 3}
    assert matches(index, [1, 2, 3]) == expected


def as_set(chains: list[Chain]) -> set[tuple[int | None, int, int]]:
    """(parent hash, block hash, local hash) of every block of a dump."""
    out = set()
    for c in chains:
        parent = c.parent_hash
        for b, t in zip(c.block_hashes, c.tokens_hashes, strict=True):
            out.add((parent, b, t))
            parent = b
    return out


# -- positional vs radix ----------------------------------------------------------------------


class Pair:
    """The oracle and the positional index fed the same events; every answer must agree."""

    def __init__(self, jump: int) -> None:
        self.oracle = RadixIndex()
        self.index = PositionalIndex(jump=jump)

    def both(self, op: str, *args: object) -> object:
        results = []
        for ix in (self.oracle, self.index):
            try:
                results.append(("ok", getattr(ix, op)(*args)))
            except InvalidEvent as exc:
                results.append(("rejected", exc.reason))
        assert results[0] == results[1], (op, args, results)
        return results[0]

    def check_query(self, locals_: list[int]) -> None:
        for early in (False, True):
            expected = self.oracle.find_matches(Prompt(locals_), early)
            assert self.index.find_matches(Prompt(locals_), early) == expected, (locals_, early)

    def check_state(self) -> None:
        self.index.check()
        assert sorted(self.index.ranks()) == sorted(self.oracle.ranks())
        assert self.index.num_blocks() == self.oracle.num_blocks()
        for rank in self.oracle.ranks():
            assert self.index.num_blocks(rank) == self.oracle.num_blocks(rank)
            assert as_set(self.index.dump(rank)) == as_set(self.oracle.dump(rank))


RANKS = [WorkerRank(w, r) for w in (1, 2, 3) for r in (0, 1)]


class StreamGen:
    """Random but plausible event streams over a tiny alphabet (so prefixes collide)."""

    def __init__(self, rng: random.Random, alphabet: int, max_len: int) -> None:
        self.rng = rng
        self.alphabet = alphabet
        self.max_len = max_len
        self.paths: list[list[int]] = [[]]  # local-hash paths seen, to build shared prefixes

    def engine_hash(self, rank: WorkerRank, path: list[int]) -> int:
        # Opaque engine hashes: a per-worker function of the prefix, not the router's chain hash.
        return (sequence_hashes(path)[-1] ^ (rank.worker_id * 0x9E3779B97F4A7C15)) & (2**64 - 1)

    def held_paths(self, index: KvIndex, rank: WorkerRank) -> list[list[int]]:
        out = []
        for c in index.dump(rank):
            base = self.path_of(index, rank, c.parent_hash)
            for i in range(len(c.tokens_hashes)):
                out.append(base + c.tokens_hashes[: i + 1])
        return out

    def path_of(self, index: KvIndex, rank: WorkerRank, block_hash: int | None) -> list[int]:
        if block_hash is None:
            return []
        for c in index.dump(rank):
            if block_hash in c.block_hashes:
                i = c.block_hashes.index(block_hash)
                return self.path_of(index, rank, c.parent_hash) + c.tokens_hashes[: i + 1]
        raise AssertionError("not held")

    def step(self, pair: Pair) -> None:
        rng = self.rng
        rank = rng.choice(RANKS)
        kind = rng.choices(["store", "remove", "clear", "remove_worker", "bad"], [60, 25, 4, 3, 8])[0]
        held = self.held_paths(pair.oracle, rank)
        if kind == "store":
            parent = rng.choice([[], *held]) if held and rng.random() < 0.7 else []
            if rng.random() < 0.3:
                parent = rng.choice(self.paths)[: rng.randint(0, self.max_len)]
                if parent and parent not in held:
                    parent = []
            n = rng.randint(1, self.max_len)
            if rng.random() < 0.5 and self.paths:
                # follow a path some rank stored, so that ranks share prefixes
                other = rng.choice(self.paths)
                tail = other[len(parent) : len(parent) + n] if other[: len(parent)] == parent else []
            else:
                tail = []
            while len(tail) < n:
                tail.append(rng.randrange(self.alphabet))
            path = parent + tail
            self.paths.append(path)
            blocks = [self.engine_hash(rank, path[: len(parent) + i + 1]) for i in range(n)]
            parent_hash = self.engine_hash(rank, parent) if parent else None
            pos = len(parent) if rng.random() < 0.5 else None
            pair.both("store", rank, parent_hash, blocks, tail, pos)
        elif kind == "remove":
            victims = [self.engine_hash(rank, p) for p in rng.sample(held, min(len(held), rng.randint(0, 3)))]
            if rng.random() < 0.3:
                victims.append(rng.getrandbits(64))
            pair.both("remove", rank, victims)
        elif kind == "clear":
            pair.both("clear", rank)
        elif kind == "remove_worker":
            pair.both("remove_worker", rank.worker_id)
        else:
            self.bad(pair, rank, held)

    def bad(self, pair: Pair, rank: WorkerRank, held: list[list[int]]) -> None:
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:  # unknown parent
            pair.both("store", rank, rng.getrandbits(64), [rng.getrandbits(64)], [1], None)
        elif choice == 1 and held:  # a held hash reused for another block
            victim = self.engine_hash(rank, rng.choice(held))
            pair.both("store", rank, None, [victim], [self.alphabet + 1], None)
        elif choice == 2 and held:  # wrong start position
            p = rng.choice(held)
            pair.both("store", rank, self.engine_hash(rank, p), [rng.getrandbits(64)], [0], len(p) + 3)
        else:  # a hash repeated within one event
            h = rng.getrandbits(64)
            pair.both("store", rank, None, [h, h], [0, 1], 0)

    def query(self) -> list[int]:
        rng = self.rng
        base = rng.choice(self.paths)[:]
        if rng.random() < 0.5:
            base = base[: rng.randint(0, len(base))]
        while rng.random() < 0.5:
            base.append(rng.randrange(self.alphabet))
        return base


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32), jump=st.sampled_from([1, 2, 3, 5, 32]), alphabet=st.sampled_from([2, 4, 50])
)
def test_positional_matches_radix_on_random_streams(seed: int, jump: int, alphabet: int) -> None:
    rng = random.Random(seed)
    gen = StreamGen(rng, alphabet=alphabet, max_len=12 if jump < 32 else 45)
    pair = Pair(jump)
    for step in range(150):
        gen.step(pair)
        for _ in range(3):
            pair.check_query(gen.query())
        if step % 25 == 0:
            pair.check_state()
    pair.check_state()


class IndexMachine(RuleBasedStateMachine):
    """Shrinkable exploration of the same comparison, one event at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.rng = random.Random(0)
        self.gen = StreamGen(self.rng, alphabet=3, max_len=6)
        self.pair = Pair(jump=2)

    @rule(seed=st.integers(0, 2**16))
    def event(self, seed: int) -> None:
        self.gen.rng.seed(seed)
        self.gen.step(self.pair)

    @rule(seed=st.integers(0, 2**16))
    def query(self, seed: int) -> None:
        self.gen.rng.seed(seed)
        self.pair.check_query(self.gen.query())

    @invariant()
    def same_state(self) -> None:
        self.pair.check_state()


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
