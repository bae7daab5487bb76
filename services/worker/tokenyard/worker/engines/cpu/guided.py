"""Guided decoding on the CPU engine: llguidance masks the tokens that cannot continue the output.

A request's JSON Schema (``{"type": "object"}`` for ``json_object``) is compiled by llguidance into
a grammar over bytes. Before each of the request's tokens is sampled, the grammar's matcher says
which vocabulary tokens keep the output a prefix of a document the schema accepts: it works on the
tokens' bytes, so tokens that are part of one UTF-8 character are usable and any text can appear
inside strings. The other tokens' logits become ``-inf`` and the request is then sampled like any
other (penalties, then greedy, or temperature, top-k, min-p and top-p over the allowed tokens).

* While the document is incomplete only tokens that continue it are allowed.
* Once the grammar accepts, the request's terminators (the model's EOS and its stop tokens) are
  allowed too; once it can take nothing more, only they are. The model's preference among the
  allowed tokens decides, so the output ends on EOS or a stop token, whichever it likes best.
* A run of whitespace is capped at :data:`MAX_WHITESPACE_RUN` bytes: JSON allows any amount
  between tokens, and a small model held to a grammar may pad instead of writing.

The mask costs well under a millisecond per step; requests without a constraint never come here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from tokenyard.worker.engines.base import GuidedDecoding, GuidedKind
from tokenyard.worker.engines.cpu.sampling import Sampler, sample

if TYPE_CHECKING:
    # Imported where used: a worker loads the vocabulary at its first guided request (the
    # executor's choice), and imports llguidance then, not on its way to SERVING.
    import llguidance

log = logging.getLogger(__name__)

MAX_WHITESPACE_RUN = 32
"""Bytes of whitespace in a row (``" \\t\\n\\r"``, between tokens or inside strings) after which
tokens made only of whitespace are masked: room for a newline and a deep indent."""
MAX_SCHEMA_BYTES = 1 << 20
"""Largest serialized schema compiled (the frontend allows 64 KiB)."""

_WHITESPACE = b" \t\n\r"
_ANY_OBJECT = '{"type":"object"}'


@dataclass(frozen=True, slots=True)
class GuideVocabulary:
    """What every guide of one engine shares: llguidance's view of the tokenizer."""

    tokenizer: llguidance.LLTokenizer
    vocab_size: int
    """The width of the model's logits."""
    tokenizer_eos: npt.NDArray[np.int64]
    """The tokenizer's own end-of-sequence ids: llguidance allows them once the grammar accepts;
    a guide allows its request's terminators instead."""
    whitespace: npt.NDArray[np.int64]
    """Ids of the tokens made only of whitespace."""

    @classmethod
    def from_tokenizer_file(cls, path: Path, vocab_size: int) -> GuideVocabulary:
        """llguidance's tokenizer of a ``tokenizer.json`` (about 0.3 s for a 49k vocabulary);
        ValueError when llguidance cannot use it."""
        import llguidance

        tokenizer = llguidance.LLTokenizer(path.read_text(encoding="utf-8"), n_vocab=vocab_size)
        whitespace = [
            token
            for token in range(tokenizer.vocab_size)
            if not tokenizer.is_special_token(token)
            and (text := tokenizer.decode_bytes([token]))
            and not text.strip(_WHITESPACE)
        ]
        return cls(
            tokenizer,
            vocab_size,
            np.array(tokenizer.eos_tokens, dtype=np.int64),
            np.array(whitespace, dtype=np.int64),
        )


class Guide:
    """One request's constraint: the tokens that may come next, and the state after each token."""

    __slots__ = ("_ended", "_only_terminators", "_vocabulary", "_whitespace_run", "matcher", "terminators")

    def __init__(
        self, matcher: llguidance.LLMatcher, vocabulary: GuideVocabulary, terminators: Sequence[int]
    ) -> None:
        self.matcher = matcher
        self.terminators = tuple(terminators)
        self._vocabulary = vocabulary
        self._only_terminators = np.zeros(vocabulary.vocab_size, dtype=np.bool_)
        self._only_terminators[[t for t in self.terminators if 0 <= t < vocabulary.vocab_size]] = True
        self._ended = False
        self._whitespace_run = 0

    @property
    def complete(self) -> bool:
        """Whether the output so far is a whole document (it may still go on: ``12`` → ``123``)."""
        return self._ended or self.matcher.is_accepting()

    @property
    def ended(self) -> bool:
        """Whether a terminator has been taken: from now on only terminators are allowed."""
        return self._ended

    def allowed(self) -> torch.Tensor:
        """``[vocab]`` booleans (a fresh tensor): the tokens that may come next."""
        return torch.from_numpy(self._allowed())

    def _allowed(self) -> npt.NDArray[np.bool_]:
        matcher = self.matcher
        if self._ended or matcher.is_stopped():
            if matcher.is_error():
                self._fail()
            return self._only_terminators.copy()
        packed = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        if matcher.is_error():
            self._fail()
            return self._only_terminators.copy()
        vocab = self._vocabulary
        allowed = np.unpackbits(packed, bitorder="little")[: vocab.vocab_size].view(np.bool_)
        allowed[vocab.tokenizer_eos] = False
        if matcher.is_accepting():
            allowed |= self._only_terminators
        if self._whitespace_run >= MAX_WHITESPACE_RUN:
            capped = allowed.copy()
            capped[vocab.whitespace] = False
            if capped.any():
                allowed = capped
        if not allowed.any():
            self._fail()
            return self._only_terminators.copy()
        return allowed

    def accept(self, token: int) -> None:
        """Advance past ``token``, which :meth:`allowed` allowed; ValueError for any other."""
        if self._ended:
            if token not in self.terminators:
                raise ValueError(f"token {token} after the end of the guided output")
            return
        if token in self.terminators and (self.matcher.is_accepting() or self.matcher.is_stopped()):
            self._ended = True
            return
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} does not continue the guided output: {self.matcher.get_error()}")
        text = self._vocabulary.tokenizer.decode_bytes([token])
        kept = text.rstrip(_WHITESPACE)
        self._whitespace_run = (self._whitespace_run if not kept else 0) + len(text) - len(kept)

    def _fail(self) -> None:
        # Not reachable with a grammar llguidance compiled: every state it reaches continues or ends.
        if not self._ended:
            log.error("guided decoding stopped on an error; ending the output: %s", self.matcher.get_error())
            self._ended = True


def mask_disallowed(logits: torch.Tensor, guide: Guide) -> torch.Tensor:
    """``-inf`` in place of the logits (one request's ``[vocab]`` row, written in place) of the
    tokens ``guide`` does not allow; the row is returned."""
    return logits.masked_fill_(~guide.allowed(), float("-inf"))


def sample_guided(
    logits: torch.Tensor,
    sampler: Sampler,
    guide: Guide,
    prompt: Sequence[int],
    output: Sequence[int],
) -> int:
    """A token from one request's ``[vocab]`` logits (left untouched) that ``guide`` allows; the
    guide takes it."""
    row = mask_disallowed(logits.clone(), guide)
    [token] = sample(row[None], [sampler], [prompt], [output])
    guide.accept(token)
    return token


class GuideFactory:
    """Compiles each request's schema against one vocabulary."""

    kinds: tuple[GuidedKind, ...] = (GuidedKind.JSON_OBJECT, GuidedKind.JSON_SCHEMA)

    def __init__(self, vocabulary: GuideVocabulary) -> None:
        self.vocabulary = vocabulary

    @classmethod
    def load(cls, tokenizer_file: Path, vocab_size: int) -> GuideFactory | None:
        """None (no guided decoding) when llguidance cannot use the tokenizer."""
        try:
            vocabulary = GuideVocabulary.from_tokenizer_file(tokenizer_file, vocab_size)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("guided decoding is off: llguidance cannot use %s: %s", tokenizer_file, exc)
            return None
        return cls(vocabulary)

    def guide(self, guided: GuidedDecoding, terminators: Sequence[int]) -> Guide:
        """A fresh guide for one request; ValueError, saying why, for a schema that cannot be
        compiled."""
        if not terminators:
            raise ValueError("guided decoding needs an end-of-sequence or stop token to end the output on")
        grammar = _grammar(guided)
        import llguidance

        matcher = llguidance.LLMatcher(self.vocabulary.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"guided_decoding.json_schema: cannot be compiled: {matcher.get_error()}")
        for warning in matcher.get_grammar_warnings():
            log.debug("guided decoding schema warning: %s", warning)
        return Guide(matcher, self.vocabulary, terminators)


def _grammar(guided: GuidedDecoding) -> str:
    if guided.kind is GuidedKind.JSON_OBJECT:
        schema = _ANY_OBJECT
    elif guided.kind is GuidedKind.JSON_SCHEMA:
        schema = guided.json_schema
        size = len(schema.encode())
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(
                f"guided_decoding.json_schema: {size} bytes, over the limit of {MAX_SCHEMA_BYTES}"
            )
        try:
            parsed = json.loads(schema)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"guided_decoding.json_schema: not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError(
                f"guided_decoding.json_schema: must be a JSON object, got {type(parsed).__name__}"
            )
    else:
        raise ValueError(f"guided_decoding: kind {guided.kind.value} is not supported")
    try:
        import llguidance

        return llguidance.LLMatcher.grammar_from_json_schema(schema)
    except ValueError as exc:
        raise ValueError(f"guided_decoding.json_schema: cannot be compiled: {exc}") from None
