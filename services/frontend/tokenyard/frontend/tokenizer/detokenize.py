"""Incremental detokenization: text deltas for a stream of generated tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenyard.frontend.tokenizer.protocol import Tokenizer

_REPLACEMENT = "\ufffd"
# Emitted tokens a decoding window holds before it restarts at the last delta (an extra decode):
# a longer window costs more per decode, a shorter one restarts more often.
_WINDOW = 4


class DetokenizeStream:
    """Turns the tokens of one response, pushed as they arrive, into text deltas whose concatenation is
    ``tokenizer.decode(all tokens)``.

    A token may end in the middle of a UTF-8 character (byte-level vocabularies split emoji and CJK
    across tokens), and some decoders drop a leading space at the start of a sequence. So each push
    decodes a short window that starts at ``prefix``, at or before the tokens of the last delta (kept
    as context), and emits what the new tokens add to the text of the window's emitted tokens, only
    when it does not end in U+FFFD: the prefix-offset/read-offset technique of vLLM and TGI. Held-back
    tokens come out on a later push or on :meth:`flush`.

    The text of the window's emitted tokens is the text of the push that emitted last, so a push
    costs one decode. Once the window holds more than ``_WINDOW`` emitted tokens it restarts at the
    last delta's first token, where a character starts, and that costs one more decode; so a long
    response costs linear time.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens before this are in the emitted text
        self._prefix_text = ""  # decode(ids[prefix:read])

    @property
    def token_ids(self) -> Sequence[int]:
        return self._ids

    def push(self, token_ids: Iterable[int]) -> str:
        """Adds tokens; returns the text they complete (possibly "")."""
        ids = self._ids
        ids.extend(token_ids)
        text = self._decode(ids[self._prefix :])
        emitted = len(self._prefix_text)
        if len(text) <= emitted or text.endswith(_REPLACEMENT):
            return ""
        last, self._read = self._read, len(ids)
        if self._read - self._prefix > _WINDOW:
            self._prefix = last
            self._prefix_text = self._decode(ids[last : self._read])
        else:
            self._prefix_text = text
        return text[emitted:]

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end comes out as U+FFFD)."""
        ids = self._ids
        delta = ""
        if self._read < len(ids):
            delta = self._decode(ids[self._prefix :])[len(self._prefix_text) :]
        self._prefix = self._read = len(ids)
        self._prefix_text = ""
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""
