"""Incremental detokenization: text deltas for a stream of generated tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenyard.frontend.tokenizer.protocol import Tokenizer

_REPLACEMENT = "\ufffd"


class DetokenizeStream:
    """Turns the tokens of one response, pushed as they arrive, into text deltas whose concatenation is
    ``tokenizer.decode(all tokens)``.

    A token may end in the middle of a UTF-8 character (byte-level vocabularies split emoji and CJK
    across tokens), and some decoders drop a leading space at the start of a sequence. So each push
    decodes a short window starting at ``prefix`` (the tokens of the last delta, kept as context) and
    emits what the new tokens add to the window's text, only when it does not end in U+FFFD: the
    prefix-offset/read-offset technique of vLLM and TGI. Held-back tokens come out on a later push or
    on :meth:`flush`. Each push decodes only the tokens since the last emitted delta, so a long
    response costs linear time.

    The window's own text would cost a second decode per push. A window starts where a delta ended,
    after a complete character, so with most decoders (byte-level BPE) the window's text is that
    delta: it is taken as such, and decoded only when the push's text does not start with it (a
    decoder that drops the window's leading space, or cleans up spaces across tokens).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens before this are in the emitted text
        # The window's text: decode(ids[prefix:read]) when exact, else the last delta standing in for it.
        self._prefix_text = ""
        self._exact = True

    @property
    def token_ids(self) -> Sequence[int]:
        return self._ids

    def push(self, token_ids: Iterable[int]) -> str:
        """Adds tokens; returns the text they complete (possibly "")."""
        ids = self._ids
        ids.extend(token_ids)
        text = self._decode(ids[self._prefix :])
        prefix_text = self._prefix_text
        if not self._exact and not text.startswith(prefix_text):
            prefix_text = self._prefix_text = self._decode(ids[self._prefix : self._read])
            self._exact = True
        if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
            delta = text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(ids)
            self._prefix_text = delta
            self._exact = False
            return delta
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end comes out as U+FFFD)."""
        ids = self._ids
        if self._read == len(ids):  # nothing held back
            self._prefix, self._prefix_text, self._exact = self._read, "", True
            return ""
        text = self._decode(ids[self._prefix :])
        if not self._exact and not text.startswith(self._prefix_text):
            self._prefix_text = self._decode(ids[self._prefix : self._read])
        delta = text[len(self._prefix_text) :]
        self._prefix = self._read = len(ids)
        self._prefix_text = ""
        self._exact = True
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""
