"""Guided decoding on the CPU engine, against the real SmolLM2 tokenizer: the llguidance mask allows
exactly the tokens that continue a valid output, sampling keeps to it, and a bad schema is refused."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from tests.fixtures.cpu import CPU
from tokenyard.worker.engines.base import GuidedDecoding, GuidedKind, SamplingParams
from tokenyard.worker.engines.cpu.guided import (
    MAX_SCHEMA_BYTES,
    MAX_WHITESPACE_RUN,
    Guide,
    GuideFactory,
    mask_disallowed,
    sample_guided,
)
from tokenyard.worker.engines.cpu.model import load_model, resolve_weights
from tokenyard.worker.engines.cpu.sampling import Sampler

pytestmark = pytest.mark.unit

VOCAB = 49152
EOS = 2  # <|im_end|>: the model's end of sequence
STOP = 0  # <|endoftext|>, as a request's stop token
OBJECT = GuidedDecoding(GuidedKind.JSON_OBJECT)
TOKYO = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["東京"]}},
    "required": ["city"],
    "additionalProperties": False,
}
BOUNDED = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "city": {"enum": ["東京", "Paris", "Zürich"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["ok", "n", "city", "code", "tags"],
    "additionalProperties": False,
}


def schema(value: dict[str, Any]) -> GuidedDecoding:
    return GuidedDecoding(GuidedKind.JSON_SCHEMA, json.dumps(value, ensure_ascii=False))


@pytest.fixture(scope="module")
def tokenizer_file() -> Path:
    path = resolve_weights(CPU)[0] / "tokenizer.json"
    if not path.is_file():
        path = load_model(CPU).weights_dir / "tokenizer.json"  # converts the shipped GGUF once
    return path


@pytest.fixture(scope="module")
def factory(tokenizer_file: Path) -> GuideFactory:
    loaded = GuideFactory.load(tokenizer_file, VOCAB)
    assert loaded is not None
    return loaded


@pytest.fixture(scope="module")
def bpe(tokenizer_file: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_file))


def encode(bpe: Tokenizer, text: str) -> list[int]:
    return list(bpe.encode(text, add_special_tokens=False).ids)


def text_of(factory: GuideFactory, tokens: list[int]) -> str:
    return factory.vocabulary.tokenizer.decode_bytes(tokens).decode("utf-8")


def feed(guide: Guide, tokens: list[int]) -> int:
    """How many of ``tokens`` the guide allows in a row (it takes each allowed one)."""
    for i, token in enumerate(tokens):
        if not bool(guide.allowed()[token]):
            return i
        guide.accept(token)
    return len(tokens)


def only(*tokens: int) -> set[int]:
    return set(tokens)


def allowed_set(guide: Guide) -> set[int]:
    return set(torch.nonzero(guide.allowed()).flatten().tolist())


def test_the_factory_honours_both_kinds_and_refuses_a_tokenizer_it_cannot_use(
    factory: GuideFactory, tmp_path: Path
) -> None:
    assert factory.kinds == (GuidedKind.JSON_OBJECT, GuidedKind.JSON_SCHEMA)
    assert factory.vocabulary.vocab_size == VOCAB
    assert factory.vocabulary.whitespace.size > 0
    (tmp_path / "tokenizer.json").write_text("{}")
    assert GuideFactory.load(tmp_path / "tokenizer.json", VOCAB) is None
    assert GuideFactory.load(tmp_path / "missing.json", VOCAB) is None


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"a": [1, 2.5e3, "x\\n", true, null, {}]}',
        '{\n  "name": "Alice",\n  "age": 34,\n  "city": "東京"\n}',
        '{"unicode": "héllo wörld ✓ 日本 🎉"}',
        '{ "spaced" : [ 1 , -0.5E-3 ] }',
    ],
)
def test_a_json_object_in_the_models_own_tokens_is_allowed_then_only_the_terminators(
    factory: GuideFactory, bpe: Tokenizer, text: str
) -> None:
    guide = factory.guide(OBJECT, (EOS, STOP))
    tokens = encode(bpe, text)
    assert feed(guide, tokens) == len(tokens)
    assert guide.complete
    assert allowed_set(guide) == only(EOS, STOP)


def test_byte_fragment_tokens_spell_non_ascii_text(factory: GuideFactory, bpe: Tokenizer) -> None:
    tokens = encode(bpe, '{"city": "東京"}')
    # "東" and "京" are each spelled by tokens that hold part of a UTF-8 character.
    fragments = [t for t in tokens if not _is_utf8(factory.vocabulary.tokenizer.decode_bytes([t]))]
    assert fragments, [factory.vocabulary.tokenizer.decode_bytes([t]) for t in tokens]
    assert feed(factory.guide(schema(TOKYO), (EOS,)), tokens) == len(tokens)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize(
    "text", ["[]", '"text"', "1", " {}", '{"a":01}', '{"a":1,}', "{'a':1}", '{"a":tru', '{"a":NaN}']
)
def test_what_is_not_a_json_object_is_refused_somewhere(
    factory: GuideFactory, bpe: Tokenizer, text: str
) -> None:
    guide = factory.guide(OBJECT, (EOS,))
    tokens = encode(bpe, text)
    assert feed(guide, tokens) < len(tokens) or not guide.complete


def test_a_schema_refuses_what_it_does_not_allow(factory: GuideFactory, bpe: Tokenizer) -> None:
    for text in ('{"city": "Tokyo"}', '{"town": "東京"}', '{"city": "東京", "x": 1}', "{}"):
        guide = factory.guide(schema(TOKYO), (EOS,))
        tokens = encode(bpe, text)
        assert feed(guide, tokens) < len(tokens) or not guide.complete, text


# llguidance's JSON strings leave out U+007F and the unassigned planes 4 to 13, which RFC 8259
# allows unescaped, and take \uXXXX escapes only for control characters: every other character is
# written as itself (so documents below are serialized with ensure_ascii=False).
CHARACTERS = st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters="\x7f") | st.characters(
    codec="utf-8", min_codepoint=0xE0000
)
JSON_VALUES: Any = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(CHARACTERS, max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(CHARACTERS, max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(CHARACTERS, max_size=6), JSON_VALUES, max_size=5), st.booleans())
def test_any_serialized_object_is_allowed_token_by_token(
    factory: GuideFactory, bpe: Tokenizer, value: dict[str, Any], indent: bool
) -> None:
    text = json.dumps(value, indent=2 if indent else None, ensure_ascii=False)
    guide = factory.guide(OBJECT, (EOS,))
    tokens = encode(bpe, text)
    assert feed(guide, tokens) == len(tokens), text
    assert guide.complete and allowed_set(guide) == only(EOS)


def _no_constants(name: str) -> object:
    raise ValueError(name)


def _unicode_escapes(text: str) -> list[int]:
    found = []
    i = 0
    while i < len(text):
        if text[i] == "\\":
            if text[i + 1 : i + 2] == "u":
                found.append(int(text[i + 2 : i + 6], 16))
            i += 2
        else:
            i += 1
    return found


def test_unicode_escapes_are_taken_for_control_characters_only(factory: GuideFactory, bpe: Tokenizer) -> None:
    for escape, allowed in (("\\u001f", True), ("\\u007F", True), ("\\u0041", False), ("\\u00e9", False)):
        tokens = encode(bpe, '{"a' + escape + '": 1}')
        guide = factory.guide(OBJECT, (EOS,))
        assert (feed(guide, tokens) == len(tokens) and guide.complete) == allowed, escape


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(CHARACTERS, max_size=6), JSON_VALUES, min_size=1, max_size=5), st.randoms())
def test_the_mask_agrees_with_the_standard_parser_on_mutated_documents(
    factory: GuideFactory, bpe: Tokenizer, value: dict[str, Any], rnd: random.Random
) -> None:
    text = json.dumps(value, ensure_ascii=False)
    at = rnd.randrange(len(text))
    mutated = text[:at] + rnd.choice('{}[]",:0-.eE tfn\\x\x01') + text[at + rnd.randrange(2) :]
    try:
        parsed: object = json.loads(mutated, parse_constant=_no_constants)
    except ValueError:
        parsed = None
    guide = factory.guide(OBJECT, (EOS,))
    tokens = encode(bpe, mutated)
    whole = feed(guide, tokens) == len(tokens) and guide.complete
    # A document is exactly one object, without whitespace around it.
    expected = (
        isinstance(parsed, dict)
        and mutated == mutated.strip()
        and all(c < 0x20 or c == 0x7F for c in _unicode_escapes(mutated))
    )
    assert whole == expected, mutated


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**31),
    st.sampled_from([0.0, 0.7, 1.0, 1.5]),
    st.sampled_from([0, 5, 50]),
    st.sampled_from([1.0, 0.9]),
    st.sampled_from([0.0, 0.05]),
    st.sampled_from([1.0, 1.3]),
)
def test_sampling_from_any_logits_keeps_to_the_schema_and_ends_on_a_terminator(
    factory: GuideFactory,
    seed: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
) -> None:
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    sampler = Sampler.from_params(params, 1.0)
    noise = torch.Generator().manual_seed(seed)
    guide = factory.guide(schema(BOUNDED), (EOS, STOP))
    prompt = (EOS, 90, 1000)
    output: list[int] = []
    while len(output) < 400:
        logits = torch.randn(VOCAB, generator=noise) * 4
        token = sample_guided(logits, sampler, guide, prompt, output)
        if token in (EOS, STOP):
            break
        output.append(token)
    assert guide.ended, text_of(factory, output)
    jsonschema.validate(json.loads(text_of(factory, output)), BOUNDED)


def logits_for(preferred: list[int]) -> torch.Tensor:
    """Higher logits for earlier tokens of ``preferred``; the rest far below."""
    row = torch.full((VOCAB,), -10.0)
    for rank, token in enumerate(preferred):
        row[token] = 10.0 - rank
    return row


def test_greedy_takes_the_most_likely_allowed_token(factory: GuideFactory, bpe: Tokenizer) -> None:
    greedy = Sampler.from_params(SamplingParams(temperature=0.0), 0.0)
    guide = factory.guide(schema(TOKYO), (EOS,))
    [hello], [brace] = encode(bpe, "hello"), encode(bpe, "{")
    logits = logits_for([hello, EOS, brace])
    assert sample_guided(logits, greedy, guide, (), ()) == brace
    assert logits[hello] == 10.0  # the caller's logits are left as they were
    # The model would rather write "Tokyo", and end at once; the schema makes it "東京".
    noise = torch.Generator().manual_seed(7)
    preferred = [EOS, *encode(bpe, '"Tokyo"')]
    output = [brace]
    while True:
        logits = torch.rand(VOCAB, generator=noise)
        logits[preferred] = torch.arange(len(preferred), 0, -1, dtype=torch.float32) + 10
        token = sample_guided(logits, greedy, guide, (), ())
        if token == EOS:
            break
        output.append(token)
        assert len(output) < 60
    assert json.loads(text_of(factory, output)) == {"city": "東京"}


def test_penalties_apply_among_the_allowed_tokens(factory: GuideFactory, bpe: Tokenizer) -> None:
    guide = factory.guide(OBJECT, (EOS,))
    feed(guide, encode(bpe, '{"a": "'))
    [first], [second] = encode(bpe, "hello"), encode(bpe, "world")
    plain = Sampler.from_params(SamplingParams(temperature=0.0), 0.0)
    penalized = Sampler.from_params(SamplingParams(temperature=0.0, repetition_penalty=10.0), 0.0)
    logits = logits_for([first, second])
    probe = factory.guide(OBJECT, (EOS,))
    feed(probe, encode(bpe, '{"a": "'))
    assert sample_guided(logits, plain, probe, (), ()) == first
    assert sample_guided(logits, penalized, guide, (first,), ()) == second


def test_once_the_grammar_accepts_the_model_chooses_among_the_terminators(
    factory: GuideFactory, bpe: Tokenizer
) -> None:
    greedy = Sampler.from_params(SamplingParams(temperature=0.0), 0.0)
    guide = factory.guide(OBJECT, (EOS, STOP))
    assert not guide.complete
    assert EOS not in allowed_set(guide) and STOP not in allowed_set(guide)
    feed(guide, encode(bpe, '{"a": 1}'))
    assert allowed_set(guide) == only(EOS, STOP)
    # The model prefers the stop token to EOS, and something else to both.
    [brace] = encode(bpe, "{")
    assert sample_guided(logits_for([brace, STOP, EOS]), greedy, guide, (), ()) == STOP
    assert guide.ended
    # Asked for more (min_tokens, ignore_eos), it keeps to the terminators.
    assert sample_guided(logits_for([brace, EOS, STOP]), greedy, guide, (), ()) == EOS


def test_a_document_that_can_go_on_allows_both_more_and_the_end(
    factory: GuideFactory, bpe: Tokenizer
) -> None:
    number = factory.guide(schema({"type": "integer"}), (EOS,))
    feed(number, encode(bpe, "12"))
    allowed = allowed_set(number)
    assert number.complete and EOS in allowed and set(encode(bpe, "3")) <= allowed


def test_a_run_of_whitespace_is_capped_but_the_document_goes_on(
    factory: GuideFactory, bpe: Tokenizer
) -> None:
    guide = factory.guide(OBJECT, (EOS,))
    [space] = encode(bpe, " ")
    feed(guide, encode(bpe, "{"))
    for _ in range(MAX_WHITESPACE_RUN):
        assert bool(guide.allowed()[space])
        guide.accept(space)
    allowed = allowed_set(guide)
    assert space not in allowed
    assert not allowed & set(factory.vocabulary.whitespace.tolist())
    [quote] = encode(bpe, '"')
    assert quote in allowed
    rest = encode(bpe, '"a": 1}')
    assert feed(guide, rest) == len(rest) and guide.complete


def test_mask_disallowed_writes_minus_infinity_outside_the_allowed_tokens(
    factory: GuideFactory, bpe: Tokenizer
) -> None:
    guide = factory.guide(schema(TOKYO), (EOS,))
    row = torch.zeros(VOCAB)
    assert mask_disallowed(row, guide) is row
    allowed = torch.isfinite(row)
    assert 0 < int(allowed.sum()) < 10
    assert torch.equal(allowed, guide.allowed())


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('{"type": "objectt"}', "Invalid type: objectt"),
        ('{"type": "string", "pattern": "(a"}', "unclosed group"),
        ('{"$ref": "#/$defs/missing"}', "does not exist"),
        ('{"type": "string", "format": "weird"}', "Unknown format"),
        (json.dumps({"enum": ["x" * MAX_SCHEMA_BYTES]}), "over the limit"),
    ],
)
def test_a_schema_that_cannot_be_compiled_is_a_value_error_saying_why(
    factory: GuideFactory, text: str, fragment: str
) -> None:
    with pytest.raises(ValueError) as err:
        factory.guide(GuidedDecoding(GuidedKind.JSON_SCHEMA, text), (EOS,))
    assert str(err.value).startswith("guided_decoding.json_schema: ") and fragment in str(err.value)


def test_a_guide_needs_a_terminator(factory: GuideFactory) -> None:
    with pytest.raises(ValueError, match="end-of-sequence"):
        factory.guide(OBJECT, ())
