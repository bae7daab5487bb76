"""Incremental detokenization: text deltas for a stream of generated tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenyard.frontend.tokenizer.protocol import Tokenizer

_REPLACEMENT = "\ufffd"


class DetokenizeStream:
    """Turns the tokens of one response, pushed as they arrive, into text deltas whose concatenation is
    ``tokenizer.decode(all tokens)``.

    A token may end in the middle of a UTF-8 character (byte-level vocabularies split emoji and CJK
    across tokens), and some decoders drop a leading space at the start of a sequence. So each step
    decodes a short window twice, with and without the new tokens, starting at ``prefix`` (tokens
    already emitted, kept as context), and emits the difference only when it does not end in U+FFFD:
    the prefix-offset/read-offset technique of vLLM and TGI. Held-back tokens come out on a later
    push or on :meth:`flush`. Each push decodes only the tokens since the last emitted delta, so a
    long response costs linear time.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens before this are in the emitted text
        self._prefix_text: str | None = ""  # decode(ids[prefix:read]), None until recomputed

    @property
    def token_ids(self) -> Sequence[int]:
        return self._ids

    def push(self, token_ids: Iterable[int]) -> str:
        """Adds tokens; returns the text they complete (possibly "")."""
        self._ids.extend(token_ids)
        prefix_text = self._window_prefix_text()
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = None
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end comes out as U+FFFD)."""
        prefix_text = self._window_prefix_text()
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return text[len(prefix_text) :]

    def _window_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        return self._prefix_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""
