"""Stop strings: cut the output at the first occurrence of any of them.

The worker only knows stop *tokens*; strings are matched here on the detokenized text. While
streaming, text that could still turn out to be the start of a stop string is held back, so a
client never sees part of a stop string that is then cut.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text safe to emit, stopped)``; once stopped, the emitted text ends before the match."""
        if not self._stop:
            return text, False
        pending = self._held + text
        cut = -1
        for s in self._stop:
            i = pending.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self._held = ""
            return pending[:cut], True
        keep = self._partial_suffix(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """Held-back text at the end of the output (it turned out not to be a stop string)."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
