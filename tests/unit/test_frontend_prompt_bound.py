"""A prompt that cannot fit the context is refused before tokenizing (which would hold the loop)."""

from __future__ import annotations

import pytest

from tokenyard.common.discovery import ModelCard
from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.generation import Endpoint, GenerationRequest
from tokenyard.frontend.preprocess import MAX_CHARS_PER_TOKEN, Preprocessor
from tokenyard.frontend.tokenizer import load_tokenizer

pytestmark = pytest.mark.unit

CARD = ModelCard(
    model="m",
    tokenizer="builtin:bytes",
    block_size=16,
    context_length=64,
    total_kv_blocks=8,
    engine="mocker",
    role="aggregated",
)


class ExplodingTokenizer:
    """Fails the test if anything tries to tokenize."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the tokenizer was used ({name}) for a prompt that cannot fit")


@pytest.mark.parametrize("chat", [False, True])
def test_oversized_prompt_is_refused_without_tokenizing(chat: bool) -> None:
    text = "x" * (CARD.context_length * MAX_CHARS_PER_TOKEN + 1)
    if chat:
        request = GenerationRequest(
            model="m",
            endpoint=Endpoint.CHAT_COMPLETIONS,
            stream=False,
            messages=[{"role": "user", "content": text}],
        )
        tokenizer = load_tokenizer("builtin:bytes")  # the template renders; encoding must not run
        with pytest.raises(InvalidArgument, match="characters"):
            Preprocessor().prepare(_NoEncode(tokenizer), request, CARD)  # type: ignore[arg-type]
    else:
        request = GenerationRequest(model="m", endpoint=Endpoint.COMPLETIONS, stream=False, prompt=text)
        with pytest.raises(InvalidArgument, match="characters"):
            Preprocessor().prepare(ExplodingTokenizer(), request, CARD)  # type: ignore[arg-type]


class _NoEncode:
    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        if name == "encode":
            raise AssertionError("encode ran for a prompt that cannot fit")
        return getattr(self._inner, name)


def test_prompt_within_the_bound_is_tokenized_and_length_checked() -> None:
    request = GenerationRequest(model="m", endpoint=Endpoint.COMPLETIONS, stream=False, prompt="x" * 100)
    with pytest.raises(InvalidArgument, match="tokens"):
        Preprocessor().prepare(load_tokenizer("builtin:bytes"), request, CARD)
