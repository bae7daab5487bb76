"""Encoding a long text in pieces: bounded memory, and the GIL released while it runs.

``tokenizers`` holds the GIL for the whole of one ``encode`` (a 30 MB prompt holds every other
request of the process for tens of seconds, even from a thread) and keeps an Encoding of the whole
text (offsets, token strings; gigabytes for a 30 MB prompt). ``encode_batch`` releases the GIL, so
a long text is cut into pieces at word boundaries and encoded a group of pieces at a time from a
worker thread; ids are gathered in a compact array.

Cutting just before a single space that follows a non-space and precedes a non-space leaves every
pre-token whole under the byte-level pre-tokenizers (a word takes its leading space), so the ids are
those of the whole text. A tokenizer for which that does not hold (a Metaspace one that marks the
start of every input) is detected once, on a probe text, and encodes whole.
"""

from __future__ import annotations

import array
import os
from collections.abc import Sequence

from tokenizers import Tokenizer as Backend

LARGE_TEXT_CHARS = 256 * 1024
"""Texts at least this long are encoded in pieces (shorter ones are faster whole)."""
PIECE_CHARS = 64 * 1024
# Pieces per encode_batch call: the ids of one group are converted under the GIL.
_GROUP = 8
_PROBE = "Hello world. The quick  brown fox, 12 jumps:\nover the lazy dog! <|im_end|> and more words"


def _cut(text: str, start: int) -> int:
    """The end of the piece that begins at ``start``: a safe cut at or after ``start + PIECE_CHARS``."""
    n = len(text)
    cut = start + PIECE_CHARS
    while cut < n:
        cut = text.find(" ", cut)
        if cut == -1:
            return n
        if not text[cut - 1].isspace() and cut + 1 < n and not text[cut + 1].isspace():
            return cut
        cut += 1
    return n


def pieces(text: str) -> list[str]:
    out: list[str] = []
    start = 0
    while start < len(text):
        end = _cut(text, start)
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
