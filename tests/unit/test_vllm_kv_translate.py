"""The translation of vLLM's KV events into Tokenyard's (engines/vllm/kv_translate.py), without vLLM.

vLLM's events are played by a small model of its block pool (LRU eviction of unreferenced blocks,
prefix hits, a request's blocks freed tail first, duplicate copies when requests that share a
prefix are scheduled together). What the translator publishes is applied to the router's
reference index, which must end up equal to the translator's snapshot, and the translator's view
(plus the orphans it keeps) must equal the hashes the pool holds.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest

from tokenyard.common.hashing import block_hashes, salt_hash
from tokenyard.router.index import WorkerRank
from tokenyard.router.index.radix import RadixIndex
from tokenyard.worker.engines.vllm.kv_translate import KvEventTranslator
from tokenyard.worker.kv_events import KvCleared, KvEventData, KvRemoved, KvStored

pytestmark = pytest.mark.unit

BS = 4
RANK = WorkerRank(1, 0)


# vLLM's event classes, by name (the translator tells them apart by class name).
@dataclass
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra_keys: list[tuple[object, ...] | None] | None = None


@dataclass
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = "GPU"


@dataclass
class AllBlocksCleared:
    pass


@dataclass
class Sink:
    index: RadixIndex = field(default_factory=RadixIndex)
    events: list[KvEventData] = field(default_factory=list)

    def __call__(self, data: KvEventData) -> None:
        self.events.append(data)
        if isinstance(data, KvStored):
            self.index.store(
                RANK,
                data.parent_hash,
                [b.block_hash for b in data.blocks],
                [b.tokens_hash for b in data.blocks],
                data.start_position,
            )
        elif isinstance(data, KvRemoved):
            self.index.remove(RANK, data.block_hashes)
        elif isinstance(data, KvCleared):
            self.index.clear(RANK)


def vllm_hash(parent: int | None, tokens: list[int], salt: str | None = None) -> int:
    return hash(("vllm", parent, tuple(tokens), salt))


def index_blocks(index: RadixIndex) -> set[int]:
    return {h for chain in index.dump(RANK) for h in chain.block_hashes}


def snapshot_blocks(translator: KvEventTranslator) -> set[int]:
    replay = RadixIndex()
    for chain in translator.snapshot():
        replay.store(
            RANK,
            chain.parent_hash,
            [b.block_hash for b in chain.blocks],
            [b.tokens_hash for b in chain.blocks],
            chain.start_position,
        )
    return index_blocks(replay)


def test_a_chain_is_published_with_our_hashes() -> None:
    sink = Sink()
    t = KvEventTranslator(BS, sink)
    tokens = list(range(10, 22))  # three blocks
    h = [vllm_hash(None, tokens[:4])]
    h.append(vllm_hash(h[0], tokens[4:8]))
    h.append(vllm_hash(h[1], tokens[8:12]))
    t.apply([BlockStored(h[:2], None, tokens[:8], BS), BlockStored(h[2:], h[1], tokens[8:], BS)])
    local, seq = block_hashes(tokens, BS)
    first, second = sink.events
    assert isinstance(first, KvStored) and isinstance(second, KvStored)
    assert (first.parent_hash, first.start_position) == (None, 0)
    assert [(b.block_hash, b.tokens_hash) for b in first.blocks] == list(zip(seq[:2], local[:2], strict=True))
    assert (second.parent_hash, second.start_position) == (seq[1], 2)
    assert second.blocks[0].block_hash == seq[2]
    assert t.block_hashes() == set(seq) == snapshot_blocks(t)


def test_the_cache_salt_seeds_the_whole_chain() -> None:
    sink = Sink()
    t = KvEventTranslator(BS, sink)
    tokens = list(range(8))
    h0 = vllm_hash(None, tokens[:4], "s")
    h1 = vllm_hash(h0, tokens[4:], "s")
    t.apply([BlockStored([h0], None, tokens[:4], BS, extra_keys=[("s",)])])
    t.apply([BlockStored([h1], h0, tokens[4:], BS, extra_keys=[None])])
    _, seq = block_hashes(tokens, BS, cache_salt="s")
    assert t.block_hashes() == set(seq)
    assert salt_hash(None, "s") != salt_hash()


def test_copies_are_published_once_and_removed_with_the_last() -> None:
    sink = Sink()
    t = KvEventTranslator(BS, sink)
    tokens = list(range(8))
    h0 = vllm_hash(None, tokens[:4])
    h1 = vllm_hash(h0, tokens[4:])
    t.apply([BlockStored([h0, h1], None, tokens, BS), BlockStored([h0, h1], None, tokens, BS)])
    assert len(sink.events) == 1
    t.apply([BlockRemoved([h1])])
    assert len(sink.events) == 1 and len(t) == 2
    t.apply([BlockRemoved([h1])])
    assert sink.events[-1] == KvRemoved((block_hashes(tokens, BS)[1][1],))
    assert len(t) == 1


def test_a_new_tail_under_a_copied_head_names_its_parent() -> None:
    sink = Sink()
    t = KvEventTranslator(BS, sink)
    tokens = list(range(8))
    h0 = vllm_hash(None, tokens[:4])
    h1 = vllm_hash(h0, tokens[4:])
    t.apply([BlockStored([h0], None, tokens[:4], BS), BlockStored([h0, h1], None, tokens, BS)])
    _, seq = block_hashes(tokens, BS)
    assert sink.events[-1] == KvStored(seq[0], 1, (sink.events[-1].blocks[0],))  # type: ignore[union-attr]
    assert index_blocks(sink.index) == set(seq)


def test_an_evicted_parent_takes_its_children_and_they_come_back_counted() -> None:
    sink = Sink()
    t = KvEventTranslator(BS, sink)
    tokens = list(range(8))
    h0 = vllm_hash(None, tokens[:4])
    h1 = vllm_hash(h0, tokens[4:])
    t.apply([BlockStored([h0, h1], None, tokens, BS)])
    t.apply([BlockRemoved([h0])])
    assert len(t) == 0 and t.orphan_hashes() == {h1} and index_blocks(sink.index) == set()
    # Recomputed: a second physical copy of h1 beside the orphan.
    t.apply([BlockStored([h0, h1], None, tokens, BS)])
    assert t.orphan_hashes() == set() and len(t) == 2
    t.apply([BlockRemoved([h1])])  # the old copy goes; the new one stays
    assert len(t) == 2
    t.apply([BlockRemoved([h1])])
    assert t.vllm_hashes() == {h0}


def test_cleared_forgets_everything_and_other_media_are_ignored() -> None:
    sink = Sink()
    t = KvEventTranslator(BS, sink)
    tokens = list(range(4))
    t.apply([BlockStored([1], None, tokens, BS, medium="CPU")])
    assert not sink.events
    t.apply([BlockStored([1], None, tokens, BS), AllBlocksCleared()])
    assert sink.events[-1] == KvCleared() and len(t) == 0 and index_blocks(sink.index) == set()


def test_an_event_of_another_block_size_or_an_unknown_parent_is_skipped() -> None:
    sink = Sink()
    t = KvEventTranslator(BS, sink)
    t.apply([BlockStored([1], None, list(range(8)), 8), BlockStored([2], 99, list(range(4)), BS)])
    assert not sink.events
    assert (t.stats.skipped_events, t.stats.unknown_parents) == (1, 1)


class BlockPool:
    """vLLM's block pool as its events see it: physical blocks, LRU free queue, prefix hits."""

    def __init__(self, num_blocks: int, emit: list[object]) -> None:
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_of: dict[int, int | None] = dict.fromkeys(range(num_blocks))
        self.refs: dict[int, int] = dict.fromkeys(range(num_blocks), 0)
        self.cached: dict[int, list[int]] = {}  # vLLM hash -> physical blocks
        self.emit = emit

    def holds(self) -> set[int]:
        return set(self.cached)

    def hits(self, hashes: list[int]) -> list[int]:
        found: list[int] = []
        for h in hashes:
            if h not in self.cached:
                break
            found.append(self.cached[h][0])
        return found

    def take(self, block: int) -> None:
        if self.refs[block] == 0:
            self.free.pop(block, None)
        self.refs[block] += 1

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of[block]
        if old is not None:
            self.cached[old].remove(block)
            if not self.cached[old]:
                del self.cached[old]
            self.hash_of[block] = None
            self.emit.append(BlockRemoved([old]))
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # the tail becomes evictable first
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_keep_router_translator_and_pool_equal(seed: int) -> None:
    rng = random.Random(seed)
    emitted: list[object] = []
    pool = BlockPool(rng.choice([12, 24, 48]), emitted)
    sink = Sink()
    t = KvEventTranslator(BS, sink)
    prefixes = [[rng.randrange(1000) for _ in range(BS * rng.randint(1, 4))] for _ in range(4)]
    for _ in range(60):
        batch = []
        for _ in range(rng.randint(1, 3)):
            prompt = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randint(0, 9))]
            if rng.random() < 0.3:
                prompt = prompt[: rng.randint(1, len(prompt))]
            batch.append(prompt)
        # Every request of the batch looks up the cache before any of them stores (vLLM's
        # scheduling step), so requests that share a prefix compute it twice: copies.
        plans = []
        for prompt in batch:
            n = len(prompt) // BS
            hashes: list[int] = []
            for i in range(n):
                hashes.append(vllm_hash(hashes[-1] if hashes else None, prompt[i * BS : (i + 1) * BS]))
            hit = pool.hits(hashes[:-1] if len(prompt) % BS == 0 else hashes)  # the last token is computed
            for block in hit:
                pool.take(block)
            plans.append((prompt, hashes, hit))
        for prompt, hashes, hit in plans:
            need = len(hashes) - len(hit)
            if need > len(pool.free):
                pool.release(hit)
                continue
            new = [pool.allocate() for _ in range(need)]
            for block, h in zip(new, hashes[len(hit) :], strict=True):
                pool.hash_of[block] = h
                pool.cached.setdefault(h, []).append(block)
            if new:
                start = len(hit)
                emitted.append(
                    BlockStored(
                        hashes[start:],
                        hashes[start - 1] if start else None,
                        prompt[start * BS : len(hashes) * BS],
                        BS,
                    )
                )
            pool.release(hit + new)
        t.apply(emitted)
        emitted.clear()
        assert index_blocks(sink.index) == t.block_hashes() == snapshot_blocks(t)
        assert t.vllm_hashes() | t.orphan_hashes() == pool.holds()
        assert not t.vllm_hashes() & t.orphan_hashes()
