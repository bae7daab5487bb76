"""A long text encoded in pieces gives exactly the ids of the whole text, specials included."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import pytest

from tokenyard.frontend import main as frontend_main
from tokenyard.frontend.tokenizer import Tokenizer, load_tokenizer
from tokenyard.frontend.tokenizer.hf import HFTokenizer
from tokenyard.frontend.tokenizer.large import (
    CACHED_PIECE_CHARS,
    CACHED_TEXT_CHARS,
    LARGE_TEXT_CHARS,
    PIECE_CHARS,
    PieceCache,
    cuts_safely,
    pieces,
)

pytestmark = pytest.mark.unit

_PARTS = [
    "the", "quick", "brown", "fox", "Über", "naïve", "日本語", "🙂", "12", "3.14", "e-mail", "don't",
    "<|im_end|>", "<|im_start|>", "(", ")", ",", ".", "!", "\t", "\n", "\n\n", "  ", "   ", " ",
]  # fmt: skip


def _text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_PARTS)
        sep = rng.choice([" ", " ", " ", "", "\n", "  "])
        out.append(word + sep)
        size += len(word) + len(sep)
    return "".join(out)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer("smollm2", cache_root=tmp_path_factory.mktemp("tok-cache"))


def test_pieces_cover_the_text_and_cut_only_before_a_single_space() -> None:
    text = _text(3 * PIECE_CHARS, 1)
    parts = pieces(text)
    assert "".join(parts) == text and len(parts) > 1
    for part in parts[1:]:
        assert part[0] == " " and not part[1].isspace()
    for part in parts[:-1]:
        assert not part[-1].isspace()


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("seed", [2, 3])
def test_a_long_text_encodes_to_the_ids_of_the_whole(smol: Tokenizer, special: bool, seed: int) -> None:
    assert isinstance(smol, HFTokenizer)
    assert cuts_safely(smol.backend)
    text = _text(LARGE_TEXT_CHARS + 3 * PIECE_CHARS, seed)
    whole = smol.backend.encode(text, add_special_tokens=special).ids
    assert list(smol.encode(text, add_special_tokens=special)) == whole


def test_a_tokenizer_whose_tokens_span_spaces_is_not_cut() -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, trainers

    from tokenyard.frontend.tokenizer.large import _PROBE

    # BPE without a pre-tokenizer learns merges across spaces: cutting before one changes the ids.
    backend = Backend(models.BPE())
    backend.train_from_iterator([_PROBE] * 50, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    assert not cuts_safely(backend)


def test_encoding_a_long_text_leaves_the_environment_alone(
    smol: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It runs on a pool thread: setting the environment there races every other thread's reads.
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    smol.encode(_text(LARGE_TEXT_CHARS + PIECE_CHARS, 4), add_special_tokens=False)
    assert "TOKENIZERS_PARALLELISM" not in os.environ


def test_the_frontend_encodes_on_one_core_from_before_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    seen: list[str | None] = []

    def run_service(*args: object, **kwargs: object) -> int:
        seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return 0

    monkeypatch.setattr(frontend_main, "run_service", run_service)
    argv: Sequence[str] = []
    assert frontend_main.main(argv) == 0
    assert seen == ["false"]


@pytest.mark.parametrize("special", [False, True])
def test_texts_that_share_a_prefix_encode_to_their_whole_ids_through_the_piece_cache(
    smol: Tokenizer, special: bool
) -> None:
    assert isinstance(smol, HFTokenizer)
    cache = PieceCache()
    prefix = _text(6 * CACHED_PIECE_CHARS, 5)
    texts = [prefix + _text(CACHED_PIECE_CHARS // 3 + i * 97, 10 + i) for i in range(6)]
    texts += [prefix[: len(prefix) // 2 + i] for i in range(4)]  # cut anywhere, spaces included
    for text in texts:
        assert (
            list(cache.encode(smol.backend, text, special))
            == smol.backend.encode(text, add_special_tokens=special).ids
        )
    assert cache.hits > cache.misses  # the shared pieces were encoded once


def test_the_piece_cache_keeps_within_its_bound_and_forgets_the_oldest(smol: Tokenizer) -> None:
    assert isinstance(smol, HFTokenizer)
    cache = PieceCache(max_chars=3 * CACHED_PIECE_CHARS)
    first = _text(2 * CACHED_PIECE_CHARS, 6)
    cache.encode(smol.backend, first, False)
    for seed in range(7, 12):
        text = _text(2 * CACHED_PIECE_CHARS, seed)
        assert list(cache.encode(smol.backend, text, False)) == smol.backend.encode(text).ids
        assert cache._chars <= cache.max_chars
    hits = cache.hits
    cache.encode(smol.backend, first, False)
    assert cache.hits == hits  # long gone


def test_prompts_of_a_few_thousand_characters_use_the_tokenizers_piece_cache(smol: Tokenizer) -> None:
    assert isinstance(smol, HFTokenizer)
    text = _text(CACHED_TEXT_CHARS + 10, 13)
    misses = smol.pieces.misses
    assert (
        list(smol.encode(text, add_special_tokens=True))
        == smol.backend.encode(text, add_special_tokens=True).ids
    )
    assert smol.pieces.misses > misses
    assert list(smol.encode(text[:100])) == smol.backend.encode(text[:100], add_special_tokens=False).ids
