"""Encoding a long text in pieces: bounded memory, the GIL released while it runs, and the
pieces of shared prefixes encoded once.

``tokenizers`` holds the GIL for the whole of one ``encode`` (a 30 MB prompt holds every other
request of the process for tens of seconds, even from a thread) and keeps an Encoding of the whole
text (offsets, token strings; gigabytes for a 30 MB prompt). ``encode_batch`` releases the GIL, so
a long text is cut into pieces at word boundaries and encoded a group of pieces at a time from a
worker thread; ids are gathered in a compact array.

Cutting just before a single space that follows a non-space and precedes a non-space leaves every
pre-token whole under the byte-level pre-tokenizers (a word takes its leading space), so the ids are
those of the whole text. A tokenizer for which that does not hold (a Metaspace one that marks the
start of every input) is detected once, on a probe text, and encodes whole.

Prompts of a few thousand characters and more mostly share long prefixes with earlier ones (a
system prompt, a document asked about again, a conversation's history): :class:`PieceCache`
cuts them the same way from the start, so that the pieces of a shared prefix are the same strings,
and keeps the ids of recent pieces; only what is new is encoded. For the 2000-token shared
prefixes of the cache-pressure workload that takes tokenizing from about 4 ms of the frontend's
event loop per request to a few tenths.
"""

from __future__ import annotations

import array
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

from tokenizers import Tokenizer as Backend

LARGE_TEXT_CHARS = 256 * 1024
"""Texts at least this long are encoded in pieces (shorter ones are faster whole)."""
PIECE_CHARS = 64 * 1024
# Pieces per encode_batch call: the ids of one group are converted under the GIL.
_GROUP = 8
_PROBE = "Hello world. The quick  brown fox, 12 jumps:\nover the lazy dog! <|im_end|> and more words"


CACHED_TEXT_CHARS = 4 * 1024
"""Texts at least this long (and shorter than :data:`LARGE_TEXT_CHARS`) go through the piece cache."""
CACHED_PIECE_CHARS = 1024
CACHE_CHARS = 16 << 20
"""Bound of the piece cache: characters of the pieces kept (their ids take about as much again)."""


def _cut(text: str, start: int, size: int = PIECE_CHARS) -> int:
    """The end of the piece that begins at ``start``: a safe cut at or after ``start + size``.
    It depends on the text up to one character past the cut only, so two texts that share a
    prefix are cut the same way within it."""
    n = len(text)
    cut = start + size
    while cut < n:
        cut = text.find(" ", cut)
        if cut == -1:
            return n
        if not text[cut - 1].isspace() and cut + 1 < n and not text[cut + 1].isspace():
            return cut
        cut += 1
    return n


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    out: list[str] = []
    start = 0
    while start < len(text):
        end = _cut(text, start, size)
        out.append(text[start:end])
        start = end
    return out


def cuts_safely(backend: Backend) -> bool:
    """Whether encoding in pieces gives this tokenizer's ids of the whole text (on a probe)."""
    whole = backend.encode(_PROBE, add_special_tokens=False).ids
    for at in (i for i, c in enumerate(_PROBE) if c == " " and _PROBE[i - 1] != " " and _PROBE[i + 1] != " "):
        parts = backend.encode_batch([_PROBE[:at], _PROBE[at:]], add_special_tokens=False)
        if [*parts[0].ids, *parts[1].ids] != whole:
            return False
    return True


def _specials(backend: Backend) -> tuple[list[int], list[int]]:
    """What ``add_special_tokens`` puts before and after a single sequence's ids."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def one_core_per_encode() -> None:
    """One core for a long prompt: ``encode_batch`` would otherwise spread it over every core,
    which the requests streaming meanwhile need (the pieces go one after the other on their
    thread). ``tokenizers`` reads the setting from the environment; call this at startup, before
    any thread runs, as setting the environment while another thread reads it is undefined
    behaviour in C."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def encode_in_pieces(backend: Backend, text: str, add_special_tokens: bool) -> Sequence[int]:
    # Single-threaded under the frontend: main() calls one_core_per_encode() at startup.
    parts = pieces(text)
    ids = array.array("I")
    before, after = _specials(backend) if add_special_tokens else ([], [])
    ids.extend(before)
    for group in range(0, len(parts), _GROUP):
        for encoding in backend.encode_batch(parts[group : group + _GROUP], add_special_tokens=False):
            ids.extend(encoding.ids)
    ids.extend(after)
    return ids


class PieceCache:
    """The ids of recently encoded pieces, by piece, bounded by :data:`CACHE_CHARS`, least
    recently used out first. Safe to use from the event loop and the tokenizing pool at once."""

    def __init__(self, max_chars: int = CACHE_CHARS) -> None:
        self.max_chars = max_chars
        self._ids: OrderedDict[str, array.array[int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def encode(self, backend: Backend, text: str, add_special_tokens: bool) -> Sequence[int]:
        parts = pieces(text, CACHED_PIECE_CHARS)
        found: dict[str, array.array[int]] = {}
        with self._lock:
            for part in parts:
                ids = self._ids.get(part)
                if ids is not None:
                    self._ids.move_to_end(part)
                    found[part] = ids
        missing = list(dict.fromkeys(p for p in parts if p not in found))
        if missing:
            for part, encoding in zip(
                missing, backend.encode_batch(missing, add_special_tokens=False), strict=True
            ):
                found[part] = array.array("I", encoding.ids)
            self._keep({p: found[p] for p in missing})
        out = array.array("I")
        before, after = _specials(backend) if add_special_tokens else ([], [])
        out.extend(before)
        for part in parts:
            out.extend(found[part])
        out.extend(after)
        with self._lock:
            self.hits += len(parts) - len(missing)
            self.misses += len(missing)
        return out

    def _keep(self, new: dict[str, array.array[int]]) -> None:
        with self._lock:
            for part, ids in new.items():
                if part not in self._ids and len(part) <= self.max_chars:
                    self._ids[part] = ids
                    self._chars += len(part)
            while self._chars > self.max_chars:
                part, _ = self._ids.popitem(last=False)
                self._chars -= len(part)
