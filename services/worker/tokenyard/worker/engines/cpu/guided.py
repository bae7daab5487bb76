"""Guided decoding on the CPU engine: only tokens that keep the output a prefix of one JSON object.

Each vocabulary token's text is worked out once per engine. A constrained request then picks its
next token as an unconstrained one would and checks the choice against the automaton, trying
further candidates only when it is refused: most steps check one token, so the constraint costs
little per step and nothing for requests without one.

* greedy: the most likely token the automaton allows;
* sampling: a draw from the usual filtered distribution, redrawn without a refused token a few
  times (which samples exactly from the allowed part of the distribution); when that keeps
  failing, the most likely allowed token, filtered or not;
* once the object is complete: the end-of-sequence (or stop) token the model likes best.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from tokenyard.worker.engines.base import GuidedDecoding, GuidedKind
from tokenyard.worker.engines.cpu.json_constraint import JsonObjectAutomaton
from tokenyard.worker.engines.cpu.sampling import Sampler, apply_penalties, probabilities

# Redraws before falling back to scanning candidates in order.
MAX_REJECTIONS = 8
# Candidates scanned before sorting the whole vocabulary.
_TOP_CANDIDATES = 64


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: byte-level BPE vocabularies spell each byte of a
    token as one printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


@dataclass(frozen=True, slots=True)
class GuideVocabulary:
    texts: tuple[str | None, ...]
    """The text of each token id; None for tokens a constrained output never takes: special and
    added tokens (the detokenizer skips or rewrites them) and tokens that are part of a UTF-8
    character (their text exists only next to their neighbours)."""

    @classmethod
    def from_tokenizer_file(cls, path: Path, vocab_size: int) -> GuideVocabulary | None:
        """The vocabulary of a ``tokenizer.json``; None unless it is byte-level BPE, the one
        kind whose tokens' texts simply concatenate."""
        from tokenizers import Tokenizer, decoders

        tokenizer = Tokenizer.from_file(str(path))
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            return None
        added = set(tokenizer.get_added_tokens_decoder())
        byte_of = _byte_of_char()
        texts: list[str | None] = [None] * vocab_size
        for token in range(min(vocab_size, tokenizer.get_vocab_size())):
            piece = tokenizer.id_to_token(token)
            if token in added or not piece:
                continue
            try:
                texts[token] = bytes(byte_of[c] for c in piece).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue
        return cls(tuple(texts))


class JsonObjectGuide:
    """One request's constraint: whether a token may come next, and the state after each token."""

    __slots__ = ("_texts", "automaton", "terminators")

    def __init__(self, vocabulary: GuideVocabulary, terminators: Sequence[int]) -> None:
        if not terminators:
            raise ValueError("a JSON object constraint needs an end-of-sequence token to end on")
        self._texts = vocabulary.texts
        self.terminators = tuple(terminators)
        self.automaton = JsonObjectAutomaton()

    @property
    def complete(self) -> bool:
        return self.automaton.complete

    def allows(self, token: int) -> bool:
        if self.automaton.complete:
            return token in self.terminators
        text = self._texts[token] if 0 <= token < len(self._texts) else None
        return text is not None and self.automaton.copy().advance_text(text)

    def accept(self, token: int) -> None:
        if self.automaton.complete:
            return
        text = self._texts[token] if 0 <= token < len(self._texts) else None
        if text is None or not self.automaton.advance_text(text):
            raise ValueError(f"token {token} does not continue the JSON object")


def sample_guided(
    logits: torch.Tensor,
    sampler: Sampler,
    guide: JsonObjectGuide,
    prompt: Sequence[int],
    output: Sequence[int],
) -> int:
    """A token from one request's ``[vocab]`` logits that ``guide`` allows; the guide takes it."""
    if sampler.penalized:
        logits = apply_penalties(logits, sampler, prompt, output)
    if guide.complete:
        token = max(guide.terminators, key=lambda t: float(logits[t]))
    elif sampler.greedy:
        token = _most_likely_allowed(logits, guide)
    else:
        token = _sample_allowed(logits, sampler, guide)
    guide.accept(token)
    return token


def _sample_allowed(logits: torch.Tensor, sampler: Sampler, guide: JsonObjectGuide) -> int:
    probs = probabilities(logits, sampler)
    for _ in range(MAX_REJECTIONS):
        if not bool(probs.sum() > 0):
            break
        token = int(torch.multinomial(probs, 1, generator=sampler.generator))
        if guide.allows(token):
            return token
        probs[token] = 0.0
    return _most_likely_allowed(logits, guide)


def _most_likely_allowed(logits: torch.Tensor, guide: JsonObjectGuide) -> int:
    best = int(torch.argmax(logits))
    if guide.allows(best):
        return best
    k = min(_TOP_CANDIDATES, logits.shape[0])
    for token in torch.topk(logits, k).indices.tolist():
        if guide.allows(token):
            return int(token)
    for token in torch.argsort(logits, descending=True)[k:].tolist():
        if guide.allows(token):
            return int(token)
    # A byte-level vocabulary spells every ASCII character, so some token always continues.
    raise ValueError("no token of the vocabulary continues the JSON object")


Guide = JsonObjectGuide


class GuideFactory:
    """Builds each request's guide over one vocabulary."""

    kinds: tuple[GuidedKind, ...] = (GuidedKind.JSON_OBJECT,)

    def __init__(self, vocabulary: GuideVocabulary) -> None:
        self.vocabulary = vocabulary

    @classmethod
    def load(cls, tokenizer_file: Path, vocab_size: int) -> GuideFactory | None:
        vocabulary = GuideVocabulary.from_tokenizer_file(tokenizer_file, vocab_size)
        return None if vocabulary is None else cls(vocabulary)

    def guide(self, guided: GuidedDecoding, terminators: Sequence[int]) -> Guide:
        return JsonObjectGuide(self.vocabulary, terminators)
