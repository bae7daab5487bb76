"""Tokenizers and chat templates for the frontend: ``load_tokenizer(model_card.tokenizer)`` gives a
:class:`Tokenizer`; :class:`DetokenizeStream` turns generated tokens back into text deltas."""

from tokenyard.frontend.tokenizer.chat_template import ChatTemplate
from tokenyard.frontend.tokenizer.detokenize import DetokenizeStream
from tokenyard.frontend.tokenizer.errors import ChatTemplateError, TokenizerError
from tokenyard.frontend.tokenizer.protocol import SpecialToken, SpecialTokens, Tokenizer
from tokenyard.frontend.tokenizer.registry import load_tokenizer

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "DetokenizeStream",
    "SpecialToken",
    "SpecialTokens",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
]
