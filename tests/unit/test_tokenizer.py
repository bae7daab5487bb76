"""The tokenizer layer: SmolLM2's tokenizer rebuilt from its GGUF file, chat templates, the sandbox,
incremental detokenization, the builtin byte tokenizer and the reference resolution.

SmolLM2's ids are checked against an independent oracle: a plain-Python byte-level BPE written from
the GPT-2 algorithm and llama.cpp's description of the ``smollm`` pre-tokenizer (every digit alone,
then GPT-2's split), fed with the vocabulary and merges read straight from the GGUF file.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import SecurityError
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as Backend

from tokenyard.frontend.tokenizer import (
    ChatTemplate,
    ChatTemplateError,
    DetokenizeStream,
    Tokenizer,
    TokenizerError,
    gguf_vocab,
    load_tokenizer,
)
from tokenyard.frontend.tokenizer.gguf_vocab import GGUFVocab, metadata_key, read_vocab
from tokenyard.frontend.tokenizer.hf import HFTokenizer
from tokenyard.frontend.tokenizer.registry import shipped_gguf_path

pytestmark = pytest.mark.unit

SMOL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]  # fmt: skip

UNICODE_SAMPLES = [
    "Hello, world!",
    "héllo wörld, ça va? Ångström naïve café",
    "世界你好\uff0c这是中文。日本語のテキスト、한국어 텍스트",
    "emoji 🎉🎉 👍🏽 👨‍👩‍👧 ❤️ 🏳️‍🌈",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n  indented\n\t\tcode",
    "numbers 1234567890 3.14159 ٣٤ \uff15 ² Ⅻ ½",
    "mixed: \u2018quotes\u2019 «guillemets» — dashes… and NBSP\u00a0here\u3000wide",
    "contractions: don't we'll they've I'm you'd it's",
    "combining e\u0301 and a\u0308 marks",
    "",
]


# --- an independent reference implementation of SmolLM2's tokenization ------------------------------


def _gpt2_alphabet() -> dict[int, str]:
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(0x100 + n) for n, b in enumerate(extra)})
    return table


def _is_space(c: str) -> bool:  # Unicode White_Space, what the regex engine's \s means
    return c in "\t\n\v\f\r\x85" or unicodedata.category(c) in ("Zs", "Zl", "Zp")


def _kind(c: str) -> str:
    if _is_space(c):
        return "space"
    cat = unicodedata.category(c)
    return "letter" if cat[0] == "L" else "number" if cat[0] == "N" else "other"


def _gpt2_split(text: str) -> Iterator[str]:
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    i, n = 0, len(text)
    while i < n:
        contraction = next(
            (c for c in ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d") if text.startswith(c, i)), None
        )
        if contraction:
            yield contraction
            i += len(contraction)
            continue
        start = i + 1 if text[i] == " " and i + 1 < n and _kind(text[i + 1]) != "space" else i
        kind = _kind(text[start])
        if kind != "space":
            end = start + 1
            while end < n and _kind(text[end]) == kind:
                end += 1
        else:
            end = i + 1
            while end < n and _is_space(text[end]):
                end += 1
            if end < n and end - i >= 2:  # \s+(?!\S): leave the last space to the word after it
                end -= 1
        yield text[i:end]
        i = end


def _smollm_pieces(text: str) -> Iterator[str]:
    chunk = ""
    for c in text:
        if unicodedata.category(c)[0] == "N":
            yield from _gpt2_split(chunk)
            chunk = ""
            yield c
        else:
            chunk += c
    yield from _gpt2_split(chunk)


class ReferenceBPE:
    def __init__(self, vocab: GGUFVocab) -> None:
        self.ids = {token: i for i, token in reversed(list(enumerate(vocab.tokens)))}
        self.ranks = {tuple(m.split(" ")): rank for rank, m in enumerate(vocab.merges)}
        self.alphabet = _gpt2_alphabet()
        self.specials = re.compile("(" + "|".join(map(re.escape, SMOL_SPECIALS)) + ")")

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            rank, at = min(
                (self.ranks.get(pair, math.inf), i) for i, pair in enumerate(itertools.pairwise(parts))
            )
            if rank == math.inf:
                break
            pair, merged, i = (parts[at], parts[at + 1]), [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for i, part in enumerate(self.specials.split(text)):
            if i % 2:  # a special token written in the text
                out.append(self.ids[part])
                continue
            for piece in _smollm_pieces(part):
                word = "".join(self.alphabet[b] for b in piece.encode())
                out.extend(self.ids[token] for token in self.bpe(word))
        return out


# A fixed alphabet whose letter/number/space classes are the same in every Unicode version in use.
_ALPHABET = list(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t\n\r.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`"
    "éèàüßñçÅØœ αβΩ жЯ 世界中文字 ひらカナ 한글 🎉😀👍🏽\u200d❤\ufe0f \u0301 ٣\uff15²Ⅻ½ \u00a0\u2003\u3000\u2028 \u2019«»—…"
)


# SmolLM2's vocabulary lacks a few bytes (six control characters, 0xF1 and 0xF2, which lead the code
# points of planes 4 to 11), and BPE without an unknown token drops what it cannot spell. Text drawn
# from everything else must survive a round trip.
_UNSPELLABLE = frozenset("\x04\x06\x13\x14\x16\x1d")
_SPELLABLE_TEXT = st.text(
    st.characters(codec="utf-8").filter(lambda c: c not in _UNSPELLABLE and ord(c) < 0x40000),
    max_size=60,
)


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenyard-cache")


@pytest.fixture(scope="module")
def smol(cache_root: Path) -> Tokenizer:
    return load_tokenizer("smollm2", cache_root=cache_root)


@pytest.fixture(scope="module")
def smol_vocab() -> GGUFVocab:
    return read_vocab(shipped_gguf_path("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def reference(smol_vocab: GGUFVocab) -> ReferenceBPE:
    return ReferenceBPE(smol_vocab)


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return load_tokenizer("builtin:bytes")


# --- SmolLM2 from the GGUF file -----------------------------------------------------------------------


def test_gguf_metadata_is_what_smollm2_declares(smol_vocab: GGUFVocab) -> None:
    assert smol_vocab.model == "gpt2"
    assert smol_vocab.pre == "smollm"
    assert len(smol_vocab.tokens) == 49152
    assert smol_vocab.tokens[:17] == SMOL_SPECIALS
    assert (smol_vocab.bos_id, smol_vocab.eos_id, smol_vocab.pad_id) == (1, 2, 2)
    assert smol_vocab.chat_template is not None and "<|im_start|>" in smol_vocab.chat_template


def test_known_ids(smol: Tokenizer, smol_vocab: GGUFVocab) -> None:
    index = smol_vocab.tokens.index
    # Single-token words have the id of their position in the GGUF vocabulary.
    for word, token in [("Hello", "Hello"), (" world", "Ġworld"), ("user", "user"), ("\n", "Ċ")]:
        assert smol.encode(word) == [index(token)]
    assert smol.encode("Hello") == [19556]
    # Digits are split one by one (llama.cpp's "smollm" pre-tokenizer); the space before them stays alone.
    ids = smol.encode("Hello, world! 12345")
    assert ids == [19556, 28, 905, 17, 216, 33, 34, 35, 36, 37]
    assert ids == [index(t) for t in ["Hello", ",", "Ġworld", "!", "Ġ", "1", "2", "3", "4", "5"]]


def test_special_tokens_are_single_ids(smol: Tokenizer) -> None:
    assert smol.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    assert smol.encode("a<|endoftext|>b<jupyter_code>") == [
        smol.encode("a")[0], 0, smol.encode("b")[0], 13
    ]  # fmt: skip
    special = smol.special_tokens
    assert (special.im_start and special.im_start.id, special.im_end and special.im_end.id) == (1, 2)
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (1, 2, 2)
    assert special.eos.text == "<|im_end|>" and special.unk is not None and special.unk.id == 0
    assert special.ids == frozenset(range(17))
    assert smol.vocab_size == 49152
    # SmolLM2 adds no BOS of its own.
    assert smol.encode("Hi", add_special_tokens=True) == smol.encode("Hi")


def test_decode_skips_special_tokens_on_request(smol: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>assistant\nSure!<|im_end|>")
    assert smol.decode(ids) == "assistant\nSure!"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nSure!<|im_end|>"


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_round_trip_and_reference_ids(smol: Tokenizer, reference: ReferenceBPE, text: str) -> None:
    ids = smol.encode(text)
    assert smol.decode(ids) == text
    assert ids == reference.encode(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(_ALPHABET), max_size=80))
def test_ids_match_reference_bpe(smol: Tokenizer, reference: ReferenceBPE, text: str) -> None:
    assert smol.encode(text) == reference.encode(text)
    assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_SPELLABLE_TEXT)
def test_round_trip_any_text(smol: Tokenizer, text: str) -> None:
    assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


def test_bytes_missing_from_the_vocabulary_are_dropped(smol: Tokenizer) -> None:
    # What the Hugging Face tokenizer of SmolLM2 does too: no unknown token, no byte fallback.
    assert smol.decode(smol.encode("a\x04b")) == "ab"
    assert smol.decode(smol.encode("\U00040000")) == "\ufffd" * 3  # the lead byte 0xF1 is lost


def test_conversion_is_cached_by_metadata(smol: Tokenizer, cache_root: Path) -> None:
    key = metadata_key(shipped_gguf_path("smollm2-135m-instruct"))
    entry = cache_root / "tokenizers" / key
    assert (entry / "tokenizer.json").is_file()
    config = json.loads((entry / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and "chat_template" in config
    again = load_tokenizer("gguf:smollm2-135m-instruct", cache_root=cache_root)
    assert [p.name for p in (cache_root / "tokenizers").iterdir()] == [key]
    assert again.encode(UNICODE_SAMPLES[3]) == smol.encode(UNICODE_SAMPLES[3])
    assert again.apply_chat_template([{"role": "user", "content": "x"}]) == smol.apply_chat_template(
        [{"role": "user", "content": "x"}]
    )


# --- chat templates -----------------------------------------------------------------------------------


def test_chat_template_renders_chatml(smol: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert smol.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not smol.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    prompt_ids = smol.encode(smol.apply_chat_template(messages))
    assert prompt_ids[0] == 1 and prompt_ids[-4:] == [1, *smol.encode("assistant\n")]


def test_chat_template_adds_smollm2_default_system_prompt(smol: Tokenizer) -> None:
    text = smol.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_failure_is_a_request_error(smol: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="content") as info:
        smol.apply_chat_template([{"role": "user"}])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_raise_exception_reaches_the_caller() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}"
        "{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(ChatTemplateError, match="Conversations must start with a user turn"):
        template.render([{"role": "assistant", "content": ""}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages['__class__'] }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.append(1) }}",
    ],
)
def test_sandbox_refuses_escapes(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="unsafe") as info:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert isinstance(info.value.__cause__, SecurityError)


def test_template_helpers_match_transformers() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "|{{ tools | tojson(indent=1) }}|{{ bos_token }}|{{ strftime_now('%Y') | length }}|{{ extra }}",
        {"bos_token": "<s>"},
    )
    text = template.render([{"role": "user", "content": "héllo"}], True, [{"a": 1}], {"extra": "kw"})
    assert text == '{"role": "user", "content": "héllo"}|[\n {\n  "a": 1\n }\n]|<s>|4|kw'


def test_template_syntax_error_is_a_tokenizer_error() -> None:
    with pytest.raises(TokenizerError, match="does not compile") as info:
        ChatTemplate("{% if %}")
    assert not isinstance(info.value, ChatTemplateError)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


# --- incremental detokenization -----------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: Sequence[int], chunks: list[int]) -> list[str]:
    stream, pieces, at = DetokenizeStream(tok), [], 0
    sizes = iter(chunks)
    while at < len(ids):
        size = next(sizes, 1)
        pieces.append(stream.push(ids[at : at + size]))
        at += size
    pieces.append(stream.flush())
    return pieces


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(_SPELLABLE_TEXT, st.text(max_size=60)), st.lists(st.integers(1, 5), max_size=60), st.booleans()
)
def test_stream_yields_exactly_the_decoded_text(
    smol: Tokenizer, text: str, chunks: list[int], single: bool
) -> None:
    ids = smol.encode(text)
    full = smol.decode(ids)
    pieces = _stream(smol, ids, [] if single else chunks)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=40), st.lists(st.integers(1, 4), max_size=40))
def test_stream_of_arbitrary_bytes_matches_decode(
    byte_tok: Tokenizer, data: bytes, chunks: list[int]
) -> None:
    ids = list(data)  # builtin:bytes: id == byte value, so any byte string, valid UTF-8 or not
    assert "".join(_stream(byte_tok, ids, chunks)) == byte_tok.decode(ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), st.lists(st.integers(1, 4), max_size=40), st.booleans())
def test_stream_of_random_tokens_matches_decode(
    smol: Tokenizer, data: st.DataObject, chunks: list[int], skip_special: bool
) -> None:
    # Any ids at all: special tokens, byte tokens that split characters, words in any order.
    ids = data.draw(st.lists(st.integers(0, smol.vocab_size - 1), max_size=40))
    stream, pieces, at = DetokenizeStream(smol, skip_special_tokens=skip_special), [], 0
    sizes = iter(chunks)
    while at < len(ids):
        size = next(sizes, 1)
        pieces.append(stream.push(ids[at : at + size]))
        at += size
    pieces.append(stream.flush())
    assert "".join(pieces) == smol.decode(ids, skip_special_tokens=skip_special)


def _sentencepiece_style() -> HFTokenizer:
    """A Llama-2-style decoder: "▁" for spaces, byte fallback tokens, and the sequence's leading space
    dropped, so that a window's text is not the text its tokens added to the response."""
    vocab = {"<unk>": 0, "</s>": 1, "▁Hello": 2, "▁world": 3, "!": 4, "▁a": 5, "b": 6, "▁": 7}
    vocab.update({f"<0x{b:02X}>": 8 + i for i, b in enumerate((0xE4, 0xB8, 0x96, 0xF0, 0x9F, 0x8E, 0x89))})
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken("</s>", special=True)])
    return HFTokenizer(backend, {"eos_token": "</s>"}, "test:sentencepiece-style")


# Words, and whole characters spelled in byte-fallback tokens (世 = E4 B8 96, 🎉 = F0 9F 8E 89):
# chunks split the characters anywhere. Byte runs that are not UTF-8 are left out on purpose:
# ByteFallback turns a whole invalid run into one U+FFFD per byte, which no incremental decoder
# reproduces (nor should: the valid characters inside such a run are real text).
_SENTENCEPIECE_UNITS = st.one_of(
    st.integers(0, 7).map(lambda i: [i]), st.sampled_from([[8, 9, 10], [11, 12, 13, 14]])
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_SENTENCEPIECE_UNITS, max_size=20), st.lists(st.integers(1, 3), max_size=40))
def test_stream_with_a_decoder_that_drops_the_leading_space_matches_decode(
    units: list[list[int]], chunks: list[int]
) -> None:
    tok = _sentencepiece_style()
    ids = [i for unit in units for i in unit]
    assert "".join(_stream(tok, ids, chunks)) == tok.decode(ids)


def test_stream_after_a_dropped_leading_space_keeps_the_space() -> None:
    tok = _sentencepiece_style()
    stream = DetokenizeStream(tok)
    assert [stream.push([i]) for i in (2, 3, 4, 5, 6)] == ["Hello", " world", "!", " a", "b"]
    assert [stream.push([i]) for i in (8, 9, 10)] == ["", "", "世"]
    assert stream.flush() == ""


def test_stream_holds_split_characters(byte_tok: Tokenizer) -> None:
    stream = DetokenizeStream(byte_tok)
    emoji = list("🎉".encode())
    assert [stream.push([b]) for b in emoji] == ["", "", "", "🎉"]
    assert stream.push([*b"ok", 0xE4, 0xB8]) == ""  # the text so far ends in half a character
    assert stream.push([0x96]) == "ok世"
    assert stream.push([0xE4]) == ""
    assert stream.flush() == "\ufffd"
    assert stream.flush() == ""


def test_stream_skips_special_tokens(smol: Tokenizer) -> None:
    stream = DetokenizeStream(smol)
    ids = smol.encode("Hi there<|im_end|>")
    assert "".join(stream.push([i]) for i in ids) + stream.flush() == "Hi there"
    assert list(stream.token_ids) == ids


# --- builtin:bytes ------------------------------------------------------------------------------------


def test_byte_tokenizer(byte_tok: Tokenizer) -> None:
    assert byte_tok.encode("héllo") == list("héllo".encode())
    assert byte_tok.encode("<|im_start|>a<|im_end|><|endoftext|>") == [257, 97, 258, 256]
    assert byte_tok.vocab_size == 259
    assert (byte_tok.bos_token_id, byte_tok.eos_token_id, byte_tok.pad_token_id) == (257, 258, 256)
    assert byte_tok.decode([257, 104, 105, 258]) == "hi"
    assert byte_tok.decode([0xF0, 0x9F]) == "\ufffd"
    chat = byte_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert byte_tok.encode(chat)[:2] == [257, ord("u")]


# --- Hugging Face files -------------------------------------------------------------------------------


def _hf_dir(tmp_path: Path, smol: Tokenizer, config: dict[str, Any] | None) -> Path:
    assert isinstance(smol, HFTokenizer)
    (tmp_path / "tokenizer.json").write_text(smol.backend.to_str())
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_model_directory(tmp_path: Path, smol: Tokenizer) -> None:
    config = {
        "eos_token": {"content": "<|endoftext|>", "special": True},
        "bos_token": None,
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "D{{ eos_token }}"},
        ],
    }
    tok = load_tokenizer(str(_hf_dir(tmp_path, smol, config)))
    assert tok.encode(UNICODE_SAMPLES[2]) == smol.encode(UNICODE_SAMPLES[2])
    assert (tok.eos_token_id, tok.bos_token_id) == (0, None)
    assert tok.apply_chat_template([]) == "D<|endoftext|>"
    # The same file named directly still finds the config beside it.
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).eos_token_id == 0


def test_model_directory_with_template_file(tmp_path: Path, smol: Tokenizer) -> None:
    directory = _hf_dir(tmp_path, smol, {"eos_token": "<|im_end|>"})
    (directory / "chat_template.jinja").write_text("{{ messages | length }} turns")
    assert load_tokenizer(str(directory)).apply_chat_template([{}, {}]) == "2 turns"


def test_model_directory_with_hostile_template(tmp_path: Path, smol: Tokenizer) -> None:
    directory = _hf_dir(tmp_path, smol, {"eos_token": "<|im_end|>", "chat_template": "{{ ''.__class__ }}"})
    with pytest.raises(ChatTemplateError, match="unsafe"):
        load_tokenizer(str(directory)).apply_chat_template([])


def test_bare_tokenizer_json(tmp_path: Path, smol: Tokenizer) -> None:
    path = _hf_dir(tmp_path, smol, None) / "tokenizer.json"
    tok = load_tokenizer(str(path))
    assert tok.eos_token_id == 2  # no config: the ChatML end token is the best guess
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# --- GGUF files made here -----------------------------------------------------------------------------


def _write_gguf(path: Path, **overrides: Any) -> Path:
    """A metadata-only GGUF file with a toy byte-level BPE vocabulary."""
    alphabet = _gpt2_alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["he", "ll", "hell", "hello", "Ġhello"]
    tokens = [*specials, "<tool>", *(alphabet[b] for b in range(256)), *merged]
    types = [3, 3, 3, 4, *([1] * (256 + len(merged)))]
    fields: dict[str, Any] = {
        "model": "gpt2",
        "pre": "smollm",
        "merges": ["h e", "l l", "he ll", "hell o", "Ġ hello"],
        "add_bos": False,
        "add_eos": False,
        "template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
        **overrides,
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(fields["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_eos_token(fields["add_eos"])
    writer.add_chat_template(fields["template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_conversion(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "toy.gguf", add_bos=True)
    tok = load_tokenizer(f"gguf:{path}", cache_root=tmp_path / "cache")
    hello = 260 + 3  # after 3 specials, <tool>, 256 bytes: he, ll, hell, hello
    assert tok.encode("hello") == [hello]
    assert tok.encode(" hello 42") == [hello + 1, 4 + ord(" "), 4 + ord("4"), 4 + ord("2")]
    assert tok.encode("hello", add_special_tokens=True) == [1, hello]
    eos_too = load_tokenizer(
        str(_write_gguf(tmp_path / "eos.gguf", add_eos=True)), cache_root=tmp_path / "cache"
    )
    assert eos_too.encode("hello", add_special_tokens=True) == [hello, 2]
    assert tok.encode("<tool><|im_end|>") == [3, 2]
    assert tok.decode([3, 2, hello]) == "<tool>hello"  # <tool> is an added token, not a special one
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    assert tok.name == f"gguf:{path}"


def test_gguf_cache_hit_skips_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_gguf(tmp_path / "toy.gguf")
    cache = tmp_path / "cache"
    first = load_tokenizer(str(path), cache_root=cache)

    def refuse(_: Path) -> GGUFVocab:
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(gguf_vocab, "read_vocab", refuse)
    second = load_tokenizer(f"gguf:{path}", cache_root=cache)
    assert second.encode(" hello hello") == first.encode(" hello hello")
    assert second.name == first.name
    # Other metadata (another template) is another key, hence another conversion.
    other = _write_gguf(tmp_path / "other.gguf", template="x")
    with pytest.raises(AssertionError, match="cached conversion"):
        load_tokenizer(str(other), cache_root=cache)


def test_gguf_broken_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "toy.gguf")
    cache = tmp_path / "cache"
    entry = cache / "tokenizers" / metadata_key(path)
    entry.mkdir(parents=True)
    (entry / "tokenizer.json").write_text("{not json")
    assert load_tokenizer(str(path), cache_root=cache).encode("hello") == [263]
    assert json.loads((entry / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_gguf_unwritable_cache_still_loads(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "toy.gguf")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert load_tokenizer(str(path), cache_root=blocker).encode("hello") == [263]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"model": "llama"}, "tokenizer.ggml.model 'llama'"), ({"pre": "qwen2"}, "tokenizer.ggml.pre 'qwen2'")],
)
def test_gguf_unsupported_vocabularies(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    path = _write_gguf(tmp_path / "toy.gguf", **overrides)
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(f"gguf:{path}", cache_root=tmp_path / "cache")
    assert f"gguf:{path}" in str(info.value)


def test_metadata_key_follows_the_metadata(tmp_path: Path) -> None:
    a = metadata_key(_write_gguf(tmp_path / "a.gguf"))
    assert a == metadata_key(_write_gguf(tmp_path / "b.gguf"))
    assert a != metadata_key(_write_gguf(tmp_path / "c.gguf", merges=["h e", "l l"]))


def test_damaged_gguf_files(tmp_path: Path) -> None:
    good = _write_gguf(tmp_path / "toy.gguf").read_bytes()
    (tmp_path / "short.gguf").write_bytes(good[: len(good) // 2])
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04" + good[4:])
    (tmp_path / "empty.gguf").write_bytes(b"")
    for name, message in [("short", "truncated"), ("fake", "bad magic"), ("empty", "cannot read")]:
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(str(tmp_path / f"{name}.gguf"), cache_root=tmp_path / "cache")


# --- references ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("/no/such/dir", "no such file or directory"),
        ("builtin:words", "unknown builtin"),
        ("gguf:/no/such/model.gguf", "no such GGUF file"),
        ("gguf:tinyllama", "no such GGUF file"),
    ],
)
def test_unknown_references(ref: str, message: str) -> None:
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(ref)
    assert repr(ref) in str(info.value)


def test_directory_without_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_tokenizer(str(tmp_path))


def test_invalid_tokenizer_json(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(TokenizerError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(str(path))
