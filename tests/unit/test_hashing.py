"""Block hashing is bit-compatible with the reference router (its published test vectors)."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from tokenyard.common.hashing import (
    XXH3_SEED,
    block_hashes,
    chain_hash,
    local_block_hashes,
    salt_hash,
    sequence_hashes,
)

pytestmark = pytest.mark.unit


def test_reference_vectors() -> None:
    assert local_block_hashes([1, 2, 3, 4], 4) == [14643705804678351452]
    local, seq = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert seq[0] == local[0] == 14643705804678351452
    assert seq[1] == 4945711292740353085
    assert salt_hash("my-lora") == 12827409268353072861


def test_chain_seed_matters() -> None:
    local, _ = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    seed0 = xxhash.xxh3_64_intdigest(local[0].to_bytes(8, "little") + local[1].to_bytes(8, "little"), seed=0)
    assert seed0 == 13257339816715102022
    assert chain_hash(local[0], local[1]) != seed0


def test_empty_salt_is_no_salt() -> None:
    assert salt_hash("", "") == salt_hash(None, None) == XXH3_SEED
    assert salt_hash(None, "tenant-a") != XXH3_SEED
    assert salt_hash("a", None) != salt_hash(None, "a")


def test_partial_block_is_not_hashed() -> None:
    assert len(local_block_hashes(list(range(10)), 4)) == 2
    assert local_block_hashes([1, 2, 3], 4) == []


def test_salt_reaches_every_sequence_hash() -> None:
    tokens = list(range(64))
    _, plain = block_hashes(tokens, 16)
    _, salted = block_hashes(tokens, 16, cache_salt="tenant")
    assert all(a != b for a, b in zip(plain, salted, strict=True))


def test_continuing_a_chain_equals_hashing_the_whole() -> None:
    local = local_block_hashes(list(range(96)), 16)
    whole = sequence_hashes(local)
    assert sequence_hashes(local[3:], parent=whole[2]) == whole[3:]


@pytest.mark.parametrize("bad", [[-1, 2, 3, 4], [2**32, 0, 0, 0]])
def test_out_of_range_tokens_are_rejected(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="token ids"):
        local_block_hashes(bad, 4)


def test_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        local_block_hashes([1, 2, 3, 4], 0)


@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200), st.integers(1, 32))
def test_matches_a_naive_implementation(tokens: list[int], block_size: int) -> None:
    naive_local = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        data = b"".join(t.to_bytes(4, "little") for t in block)
        naive_local.append(xxhash.xxh3_64_intdigest(data, seed=1337))
    assert local_block_hashes(tokens, block_size) == naive_local
    assert local_block_hashes(np.array(tokens, dtype=np.int64), block_size) == naive_local
    naive_seq: list[int] = []
    for h in naive_local:
        naive_seq.append(h if not naive_seq else chain_hash(naive_seq[-1], h))
    assert sequence_hashes(naive_local) == naive_seq
