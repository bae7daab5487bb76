"""What the simulated engine takes in and gives back, and how it invents tokens.

Pseudo tokens: the token at absolute sequence position ``p`` (0 = the first prompt token) of a
request with seed ``s`` is ``XXH3-64(le_u64(s) || le_u64(p), seed=0) mod vocab_size``. It depends
on nothing else, so a request that is continued elsewhere (its generated tokens appended to the
prompt, the same seed) produces exactly the continuation it would have produced. Without an
explicit seed the seed is ``XXH3-64(utf8(request_id))``, which a migrated request keeps.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import xxhash

_PAIR = struct.Struct("<QQ")
_U64 = (1 << 64) - 1


def request_seed(request_id: str, seed: int | None = None) -> int:
    """The seed pseudo tokens of a request are drawn with."""
    return seed & _U64 if seed is not None else xxhash.xxh3_64_intdigest(request_id.encode())


def pseudo_token(seed: int, position: int, vocab_size: int) -> int:
    """The token a request with ``seed`` generates at absolute sequence ``position``."""
    return xxhash.xxh3_64_intdigest(_PAIR.pack(seed & _U64, position), seed=0) % vocab_size


class FinishReason(StrEnum):
    STOP = "stop"
    """A stop token or the end-of-sequence token, once ``min_tokens`` were generated."""
    LENGTH = "length"
    """``max_tokens`` generated, or the sequence reached the longest the engine holds."""
    CANCELLED = "cancelled"
    """Aborted before it finished."""


@dataclass(frozen=True, slots=True)
class MockerRequest:
    request_id: str
    token_ids: Sequence[int]
    """The prompt, already tokenized (for a continued request: prompt plus tokens generated so far).
    Stored as a tuple whatever sequence the caller passes."""
    max_tokens: int
    min_tokens: int = 0
    """Stop and end-of-sequence tokens do not end the request before this many tokens."""
    stop_token_ids: Collection[int] = field(default_factory=frozenset)
    """Stored as a frozenset."""
    ignore_eos: bool = False
    seed: int | None = None
    priority: int = 0
    """Larger is served first; equal priorities are first come, first served."""
    dp_rank: int | None = None
    """Data-parallel rank to run on; None picks the least loaded one."""
    lora_name: str | None = None
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        # Accept any sequence/iterable from callers while keeping the dataclass hashable and frozen.
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids))
        if not self.request_id:
            raise ValueError("request_id must not be empty")
        if not self.token_ids:
            raise ValueError("the prompt must have at least one token")
        if any(not 0 <= t <= 0xFFFFFFFF for t in self.token_ids):
            raise ValueError("token ids must be integers in [0, 2**32)")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must not be negative, got {self.min_tokens}")
        if self.dp_rank is not None and self.dp_rank < 0:
            raise ValueError(f"dp_rank must not be negative, got {self.dp_rank}")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens found in the prefix cache when the request was first scheduled."""


@dataclass(frozen=True, slots=True)
class Timings:
    """Wall-clock seconds since the engine accepted the request."""

    first_token_s: float | None
    """When the first token was handed out; None if the request ended before any."""
    total_s: float


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Every token ready since the previous chunk; the last chunk also says how the request ended."""

    token_ids: tuple[int, ...]
    dp_rank: int
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
