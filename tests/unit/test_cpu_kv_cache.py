"""Where the CPU engine's K and V live: slots follow the pool's block tables, and a block's bytes
round trip into another engine's storage through the pool's import. The pool itself (caching,
events, eviction) is tested in test_block_pool.py."""

from __future__ import annotations

import pytest
import torch

from tokenyard.common.hashing import block_hashes
from tokenyard.worker.engines.core.block_pool import Block, BlockPool, BlockTable
from tokenyard.worker.engines.cpu.kv_storage import KvGeometry, KvStorage
from tokenyard.worker.kv_events import KvEventData, KvStored, StoredBlock

pytestmark = pytest.mark.unit

BS = 4
GEOMETRY = KvGeometry(num_layers=2, num_kv_heads=1, head_dim=2, block_size=BS)


def make(num_blocks: int) -> tuple[BlockPool, KvStorage, list[KvEventData]]:
    events: list[KvEventData] = []
    return BlockPool(num_blocks, BS, sink=events.append), KvStorage(num_blocks, GEOMETRY), events


def admit(pool: BlockPool, tokens: list[int]) -> BlockTable:
    table = BlockTable()
    assert pool.allocate(table, len(tokens))
    return table


def test_geometry_block_bytes() -> None:
    # K and V, 2 layers, 4 slots, 1 head of 2 floats, 4 bytes each.
    assert GEOMETRY.block_bytes == 2 * 2 * 4 * 1 * 2 * 4
    storage = KvStorage(8, GEOMETRY)
    assert storage.k.shape == storage.v.shape == (2, 8 * BS, 1, 2)


def test_slots_follow_the_block_table() -> None:
    pool, storage, _ = make(8)
    admit(pool, list(range(4)))  # takes block 0
    table = admit(pool, list(range(10, 20)))
    assert table.block_ids == [1, 2, 3]
    assert storage.slots(table, 0, 10).tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert storage.slots(table, 5, 9).tolist() == [9, 10, 11, 12]


def test_block_bytes_round_trip_into_another_storage() -> None:
    source_pool, source, _ = make(4)
    tokens = list(range(9))
    local, seq = block_hashes(tokens, BS)
    table = admit(source_pool, tokens)
    slots = source.slots(table, 0, 8)
    source.k[:, slots] = torch.arange(2 * 8 * 2, dtype=torch.float32).view(2, 8, 1, 2)
    source.v[:, slots] = -source.k[:, slots]
    source_pool.commit(table, len(tokens), seq, local)
    data = [source.read_block(b) for b in table.blocks[:2]]
    assert all(len(d) == GEOMETRY.block_bytes for d in data)

    target_pool, target, events = make(8)
    admit(target_pool, list(range(40, 44)))  # takes block 0, so the blocks land elsewhere

    def fill(block: Block, i: int) -> None:
        target.write_block(block, data[i])

    imported = BlockTable()
    assert target_pool.import_blocks(imported, seq[:2], local[:2], fill)
    assert imported.block_ids != table.block_ids[:2]
    assert events == [KvStored(None, 0, (StoredBlock(seq[0], local[0]), StoredBlock(seq[1], local[1])))]
    got = target.slots(imported, 0, 8)
    assert torch.equal(target.k[:, got], source.k[:, slots])
    assert torch.equal(target.v[:, got], source.v[:, slots])
    assert [target.read_block(b) for b in imported.blocks] == data
    with pytest.raises(ValueError, match="bytes"):
        target.write_block(imported.blocks[0], b"short")
