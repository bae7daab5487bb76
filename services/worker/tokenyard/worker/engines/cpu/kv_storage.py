"""Where the CPU engine's K and V live: two tensors per engine, indexed by the block pool's ids.

``[num_layers, num_blocks * block_size, kv_heads, head_dim]`` each: a block is ``block_size``
consecutive slots, and a token's slot is ``block_id * block_size + offset``. Which blocks a
sequence uses is its :class:`~tokenyard.worker.engines.core.block_pool.BlockTable`; the pool
(:mod:`tokenyard.worker.engines.core.block_pool`) decides, this only stores.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numpy as np
import torch

from tokenyard.worker.engines.core.block_pool import Block, BlockTable


@dataclass(frozen=True, slots=True)
class KvGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    @property
    def block_bytes(self) -> int:
        """K and V of one block, every layer, float32."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * 4


class KvStorage:
    def __init__(self, num_blocks: int, geometry: KvGeometry) -> None:
        self.num_blocks = num_blocks
        self.geometry = geometry
        self.block_size = geometry.block_size
        shape = (
            geometry.num_layers,
            num_blocks * geometry.block_size,
            geometry.num_kv_heads,
            geometry.head_dim,
        )
        self.k = _zeros(shape)
        self.v = _zeros(shape)

    def slots(self, table: BlockTable, start: int, end: int) -> torch.Tensor:
        """Pool slots of the table's tokens ``[start, end)``, as a 1-D int64 tensor."""
        bs = self.block_size
        first, last = start // bs, -(-end // bs)
        ids = torch.tensor([b.block_id for b in table.blocks[first:last]], dtype=torch.int64)
        slots = (ids[:, None] * bs + torch.arange(bs, dtype=torch.int64)).flatten()
        return slots[start - first * bs : end - first * bs]

    # KV bytes are copied with numpy views of the pools, not torch ops: these run on the event
    # loop, and a torch op big enough to go parallel would start a second OpenMP thread team
    # there, which slows every forward pass on the compute thread (the teams' idle workers
    # stop spinning and sleep, and each parallel region then pays for waking them).

    def read_block(self, block: Block) -> bytes:
        """K then V of every layer, ``[2, num_layers, block_size, kv_heads, head_dim]`` float32 LE."""
        lo = block.block_id * self.block_size
        hi = lo + self.block_size
        return self.k.numpy()[:, lo:hi].tobytes() + self.v.numpy()[:, lo:hi].tobytes()

    def write_block(self, block: Block, data: bytes) -> None:
        g = self.geometry
        if len(data) != g.block_bytes:
            raise ValueError(f"a KV block of this layout is {g.block_bytes} bytes, got {len(data)}")
        values = np.frombuffer(data, dtype="<f4").reshape(
            2, g.num_layers, g.block_size, g.num_kv_heads, g.head_dim
        )
        lo = block.block_id * self.block_size
        hi = lo + self.block_size
        self.k.numpy()[:, lo:hi] = values[0]
        self.v.numpy()[:, lo:hi] = values[1]


def _zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of zeros in fresh anonymous memory: the kernel hands out zero pages on
    first touch, so a pool costs neither time to clear at start (about a second for the default
    GiB) nor memory for the blocks never used. Zeros matter: decode padding reads slot 0, masked,
    and a masked NaN would still poison the softmax."""
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape, dtype=torch.float32)
    # Private and anonymous (mmap adds MAP_ANONYMOUS for fd -1): never shared, never written back.
    memory = mmap.mmap(-1, count * 4, flags=mmap.MAP_PRIVATE)
    # The tensor keeps the mapping alive (it holds the buffer) for as long as any view of it lives.
    return torch.frombuffer(memory, dtype=torch.float32, count=count).view(shape)
