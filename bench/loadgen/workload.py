"""What to send: synthetic shared-prefix prompts and Mooncake trace replay.

Prompts are built as token ids; text prompts are derived from them word by word (``as_text``),
so two prompts that share a token prefix also share a text prefix. Everything is seeded: the same
flags give the same prompts in every run, which is what lets an A/B comparison send both
configurations the same requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

# Common English words that BPE vocabularies (GPT-2, Llama, SmolLM) hold as one token with their
# leading space, so a text prompt of N words is close to N tokens. Close, not exact: the server's
# usage.prompt_tokens is what results report.
_WORD_LIST = """
    the of and to in is it you that he was for on are with as his they be at one have this from
    or had by hot word but what some we can out other were all there when up use your how said an
    each she which do their time if will way about many then them write would like so these her
    long make thing see him two has look more day could go come did number sound no most people my
    over know water than call first who may down side been now find any new work part take get
    place made live where after back little only round man year came show every good me give our
    under name very through just form sentence great think say help low line differ turn cause much
    mean before move right boy old too same tell does set three want air well also play small end
    put home read hand port large spell add even land here must big high such follow act why ask
    men change went light kind off need house picture try us again animal point mother world near
    build self earth father head stand own page should country found answer school grow study
    still learn plant cover food sun four between state keep eye never last let thought city tree
    cross farm hard start might story saw far sea draw left late run while press close night real
    life few north open seem together next white children begin got walk example ease paper group
    always music those both mark often letter until mile river car feet care second book carry
    took science eat room friend began idea fish mountain stop once base hear horse cut sure watch
    color face wood main enough plain girl usual young ready above ever red list though feel talk
    bird soon body dog family direct pose leave song measure door product black short numeral
    class wind question happen complete ship area half rock order fire south problem piece told
    knew pass since top whole king space heard best hour better true during hundred five remember
    step early hold west ground interest reach fast verb sing listen six table travel less morning
    ten simple several vowel toward war lay against pattern slow center love person money serve
    appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall
    lead cry dark machine note wait plan figure star box noun field rest correct able pound done
    beauty drive stood contain front teach week final gave green oh quick develop ocean warm free
    minute strong special mind behind clear tail produce fact street inch multiply nothing course
    stay wheel full force blue object decide surface deep moon island foot system busy test record
    boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate
    """
WORDS = tuple(_WORD_LIST.split())


@dataclass(frozen=True)
class TokenRange:
    """Token ids are drawn from [low, high): away from the special tokens at the start of vocabularies."""

    low: int = 1000
    high: int = 30000

    @classmethod
    def parse(cls, text: str) -> TokenRange:
        low, _, high = text.partition(":")
        parsed = cls(int(low), int(high))
        if not 0 <= parsed.low < parsed.high:
            raise ValueError(f"token range {text!r}: need 0 <= LOW < HIGH")
        return parsed

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        return [int(t) for t in rng.integers(self.low, self.high, n)]


@dataclass(frozen=True)
class RequestSpec:
    index: int
    tokens: list[int]
    output_len: int
    arrival_s: float | None = None
    """Offset from the start of the schedule, for fixed-schedule replay; None outside traces."""
    session_id: str | None = None
    """The conversation a trace row belongs to; sent as a routing hint (``nvext.session_id``)."""


def as_text(tokens: list[int]) -> str:
    return " ".join(WORDS[t % len(WORDS)] for t in tokens)


class Workload(Protocol):
    def __iter__(self) -> Iterator[RequestSpec]: ...

    @property
    def size(self) -> int | None:
        """How many requests the workload holds; None when it is endless."""
        ...

    def describe(self) -> dict[str, object]: ...


# Seeds are lists [seed, stream, key]: numpy's SeedSequence mixes them, so each prefix, suffix
# and trace block gets an independent stream that does not depend on generation order.
_PREFIX, _SUFFIX, _BLOCK, _PAD = 0, 1, 2, 3


class SharedPrefixWorkload:
    """Endless requests, each one of ``num_prefixes`` shared prefixes plus a unique suffix.

    The prefix of each request is drawn at random (seeded), so a prefix's requests arrive
    interleaved with the others' as they would from many users of a few system prompts.
    """

    def __init__(
        self,
        *,
        num_prefixes: int,
        prefix_len: int,
        suffix_len: int,
        output_len: int,
        seed: int = 0,
        tokens: TokenRange = TokenRange(),
    ) -> None:
        if num_prefixes < 1:
            raise ValueError("num_prefixes must be at least 1")
        if prefix_len < 0 or suffix_len < 0 or prefix_len + suffix_len == 0:
            raise ValueError("prefix_len and suffix_len must be >= 0 and not both 0")
        if output_len < 1:
            raise ValueError("output_len must be at least 1")
        self.num_prefixes = num_prefixes
        self.prefix_len = prefix_len
        self.suffix_len = suffix_len
        self.output_len = output_len
        self.seed = seed
        self.token_range = tokens
        self.prefixes = [
            tokens.draw(np.random.default_rng([seed, _PREFIX, i]), prefix_len) for i in range(num_prefixes)
        ]

    @property
    def size(self) -> int | None:
        return None

    def prefix_of(self, index: int) -> int:
        return int(np.random.default_rng([self.seed, _SUFFIX, index]).integers(self.num_prefixes))

    def request(self, index: int) -> RequestSpec:
        rng = np.random.default_rng([self.seed, _SUFFIX, index])
        prefix = self.prefixes[int(rng.integers(self.num_prefixes))]
        return RequestSpec(index, prefix + self.token_range.draw(rng, self.suffix_len), self.output_len)

    def __iter__(self) -> Iterator[RequestSpec]:
        index = 0
        while True:
            yield self.request(index)
            index += 1

    def describe(self) -> dict[str, object]:
        return {
            "kind": "synthetic",
            "num_prefixes": self.num_prefixes,
            "prefix_len": self.prefix_len,
            "suffix_len": self.suffix_len,
            "output_len": self.output_len,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class TraceEntry:
    timestamp_ms: float | None
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    session_id: str | None = None


def load_trace(path: Path) -> list[TraceEntry]:
    """Mooncake JSONL: one request per line, ``timestamp`` in ms, ``hash_ids`` naming prompt blocks,
    optionally ``session_id`` naming the conversation (bench/traces/conversations.py)."""
    entries: list[TraceEntry] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ts = row.get("timestamp")
                entry = TraceEntry(
                    timestamp_ms=None if ts is None else float(ts),
                    input_length=int(row["input_length"]),
                    output_length=int(row["output_length"]),
                    hash_ids=tuple(int(h) for h in row.get("hash_ids", ())),
                    session_id=None if row.get("session_id") is None else str(row["session_id"]),
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace row: {exc}") from exc
            if entry.input_length < 1 or entry.output_length < 1 or any(h < 0 for h in entry.hash_ids):
                raise ValueError(f"{path}:{lineno}: lengths must be >= 1 and hash_ids >= 0")
            entries.append(entry)
    return entries


class MooncakeWorkload:
    """Replays a trace: equal hash ids become equal token blocks of ``block_size`` tokens.

    A prompt is the concatenation of its blocks cut to ``input_length`` (the last block of a
    trace row is usually partial); a prompt longer than its blocks is padded with tokens unique
    to that request, so padding never creates sharing the trace did not record.
    """

    def __init__(
        self,
        entries: list[TraceEntry],
        *,
        block_size: int = 512,
        seed: int = 0,
        tokens: TokenRange = TokenRange(),
        path: str = "",
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        # Fixed-schedule replay sends in list order, so the list must be in time order.
        if all(e.timestamp_ms is not None for e in entries):
            entries = sorted(entries, key=lambda e: e.timestamp_ms or 0.0)
        self.entries = entries
        self.block_size = block_size
        self.seed = seed
        self.token_range = tokens
        self.path = path
        first = [e.timestamp_ms for e in entries if e.timestamp_ms is not None]
        self._t0 = min(first) if first else 0.0
        # Traces repeat hot blocks often; the cache bounds memory while sparing most regenerations.
        self.block = lru_cache(maxsize=8192)(self._block)

    @property
    def size(self) -> int | None:
        return len(self.entries)

    @property
    def has_timestamps(self) -> bool:
        return all(e.timestamp_ms is not None for e in self.entries)

    def _block(self, hash_id: int) -> list[int]:
        return self.token_range.draw(np.random.default_rng([self.seed, _BLOCK, hash_id]), self.block_size)

    def request(self, index: int) -> RequestSpec:
        entry = self.entries[index]
        tokens: list[int] = []
        for h in entry.hash_ids:
            if len(tokens) >= entry.input_length:
                break
            tokens += self.block(h)
        del tokens[entry.input_length :]
        missing = entry.input_length - len(tokens)
        if missing:
            tokens += self.token_range.draw(np.random.default_rng([self.seed, _PAD, index]), missing)
        arrival = None if entry.timestamp_ms is None else (entry.timestamp_ms - self._t0) / 1000.0
        return RequestSpec(index, tokens, entry.output_length, arrival, entry.session_id)

    def __iter__(self) -> Iterator[RequestSpec]:
        for index in range(len(self.entries)):
            yield self.request(index)

    def describe(self) -> dict[str, object]:
        return {
            "kind": "mooncake",
            "trace": self.path,
            "requests": len(self.entries),
            "block_size": self.block_size,
            "seed": self.seed,
        }
