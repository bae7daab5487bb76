"""KV block hashing shared by the frontend, the router and the workers.

Bit-compatible with the reference router (see the design notes, "Block and sequence hashing"):

* a block's *local* hash is XXH3-64 of its tokens as little-endian u32, seeded with the
  request's salt hash (1337 when there is no LoRA adapter and no cache salt);
* the *sequence* hash chains: ``seq[0] = local[0]``,
  ``seq[i] = XXH3-64(le_u64(seq[i-1]) || le_u64(local[i]), seed=1337)``.

Only complete blocks are hashed; a trailing partial block has no stable identity.

Hashing sits on every request's path, so the work per block is kept to one C call: the whole
prompt is packed once (``array('I')`` for lists, numpy for arrays), and the per-block slices are
hashed from one ``memoryview`` without copies.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import xxhash

XXH3_SEED = 1337
"""Seed of local block hashes without salt, and of the sequence-hash chain."""

_U64_MASK = (1 << 64) - 1
_PAIR = struct.Struct("<QQ")
_xxh3_64 = xxhash.xxh3_64_intdigest
_BIG_ENDIAN = sys.byteorder == "big"
if array("I").itemsize != 4:  # pragma: no cover - every platform CPython supports today has 32-bit uint
    raise ImportError("array('I') must be 32 bits wide for the block byte layout")


def salt_hash(lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """The per-request seed of local block hashes. Empty strings count as absent."""
    seed = XXH3_SEED
    if lora_name:
        seed += _xxh3_64(lora_name.encode(), seed=0)
    if cache_salt:
        seed += _xxh3_64(cache_salt.encode(), seed=1)
    return seed & _U64_MASK


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> memoryview:
    if not isinstance(tokens, np.ndarray):
        # array('I') packs a list of ints about 3x faster than numpy and range-checks each one.
        try:
            packed = array("I", tokens)
        except (OverflowError, TypeError):
            raise ValueError("token ids must be integers in [0, 2**32)") from None
        if _BIG_ENDIAN:
            packed.byteswap()
        return memoryview(packed).cast("B")
    arr = tokens
    if arr.ndim != 1:
        raise ValueError("tokens must be a flat sequence of integers")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise ValueError("token ids must be integers in [0, 2**32)")
    packed_arr: Any = np.ascontiguousarray(arr, dtype="<u4")
    return memoryview(packed_arr).cast("B")


def local_block_hashes(
    tokens: Sequence[int] | np.ndarray, block_size: int, seed: int = XXH3_SEED
) -> list[int]:
    """Content hash of every complete block of ``tokens``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    data = _token_bytes(tokens)
    stride = 4 * block_size
    n_blocks = len(data) // stride
    return [_xxh3_64(data[i * stride : (i + 1) * stride], seed=seed) for i in range(n_blocks)]


def chain_hash(parent: int, local: int) -> int:
    """Sequence hash of a block whose predecessor has sequence hash ``parent``."""
    return _xxh3_64(_PAIR.pack(parent, local), seed=XXH3_SEED)


def sequence_hashes(local_hashes: Iterable[int], parent: int | None = None) -> list[int]:
    """Prefix-chained identities of consecutive blocks, continuing from ``parent`` if given."""
    out: list[int] = []
    prev = parent
    pack = _PAIR.pack
    for local in local_hashes:
        prev = local if prev is None else _xxh3_64(pack(prev, local), seed=XXH3_SEED)
        out.append(prev)
    return out


def block_hashes(
    tokens: Sequence[int] | np.ndarray,
    block_size: int,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> tuple[list[int], list[int]]:
    """``(local_hashes, sequence_hashes)`` of every complete block of a prompt."""
    local = local_block_hashes(tokens, block_size, salt_hash(lora_name, cache_salt))
    return local, sequence_hashes(local)
