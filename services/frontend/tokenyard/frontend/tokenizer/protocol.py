"""What the frontend needs from a tokenizer, whatever builds it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class SpecialToken:
    id: int
    text: str


@dataclass(frozen=True, slots=True)
class SpecialTokens:
    """The named special tokens of a vocabulary; ``ids`` holds every special (control) token id."""

    eos: SpecialToken
    bos: SpecialToken | None = None
    pad: SpecialToken | None = None
    unk: SpecialToken | None = None
    im_start: SpecialToken | None = None
    im_end: SpecialToken | None = None
    ids: frozenset[int] = frozenset()


class Tokenizer(Protocol):
    @property
    def name(self) -> str:
        """Where the tokenizer came from, for logs and error messages."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        ...

    @property
    def special_tokens(self) -> SpecialTokens: ...

    @property
    def eos_token_id(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    @property
    def has_chat_template(self) -> bool: ...

    def encode(self, text: str, add_special_tokens: bool = False) -> Sequence[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) always become
        their single id; ``add_special_tokens`` adds what the model wants around a sequence (a BOS)."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; bytes that do not form UTF-8 come out as U+FFFD."""
        ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        *,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for a conversation; raises ChatTemplateError when the template refuses it."""
        ...
