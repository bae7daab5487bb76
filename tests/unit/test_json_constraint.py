"""The JSON object automaton of guided decoding, and the token choice built on it."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenyard.worker.engines.base import SamplingParams
from tokenyard.worker.engines.cpu.guided import GuideVocabulary, JsonObjectGuide, sample_guided
from tokenyard.worker.engines.cpu.json_constraint import MAX_WHITESPACE_RUN, JsonObjectAutomaton
from tokenyard.worker.engines.cpu.sampling import Sampler

pytestmark = pytest.mark.unit

VALID = [
    '{"a": [1, 2.5e3, "x\\n", true, null, {}]}',
    "{}",
    ' {"k":-0.5E-3}',
    '\n{"u": "\\u00e9\\"\\\\\\/\\b\\f\\r\\t", "b": [[], [{}], [0, -0, 1e+2, 3E-4, 0.0]]}',
    '{"nested": {"deeper": {"deepest": false}}, "list": [true, false, null]}',
    '{"unicode": "héllo wörld ✓ 日本"}',
    '{ "spaced" : [ 1 , 2 ] }',
]
INVALID = [
    "[]",
    '"text"',
    "1",
    '{"a":01}',
    '{"a":1.}',
    '{"a":.5}',
    '{"a":+1}',
    '{"a":tru}',
    '{"a":True}',
    "{a:1}",
    "{'a':1}",
    '{"a":1,}',
    '{"a" 1}',
    '{"a":"\x01"}',
    "{}x",
    "{} ",
    '{"a":-}',
    '{"a":1e}',
    '{"a":[1,]}',
    '{"a":\\x"}',
    '{"a":"\\x"}',
    '{"a":"\\u12g4"}',
    '{"a":[1}',
    '{"a":{]}',
    '{"a":1}}',
    "{,}",
    '{"a":NaN}',
    " " * (MAX_WHITESPACE_RUN + 1) + "{}",
]


def accepts(text: str) -> tuple[bool, bool]:
    """(every character accepted, complete at the end)."""
    automaton = JsonObjectAutomaton()
    for char in text:
        if not automaton.advance(char):
            return False, False
    return True, automaton.complete


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_are_accepted_and_complete(text: str) -> None:
    assert isinstance(json.loads(text), dict)
    assert accepts(text) == (True, True)


@pytest.mark.parametrize("text", VALID)
def test_every_proper_prefix_of_a_valid_object_is_accepted_but_incomplete(text: str) -> None:
    for end in range(len(text)):
        assert accepts(text[:end]) == (True, False), text[:end]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_documents_are_refused(text: str) -> None:
    assert accepts(text) != (True, True)


def test_a_rejected_character_leaves_a_copy_taken_before_it_untouched() -> None:
    automaton = JsonObjectAutomaton()
    assert automaton.advance_text('{"a": 1')
    probe = automaton.copy()
    assert not probe.advance("x")
    assert automaton.advance_text("2}") and automaton.complete
    assert not automaton.advance("}")


def test_whitespace_runs_are_capped_where_json_allows_whitespace_but_not_inside_strings() -> None:
    automaton = JsonObjectAutomaton(max_whitespace=2)
    assert automaton.advance_text('{ \n"a  b   c":')
    assert not automaton.copy().advance_text("   ")
    assert automaton.advance_text("  1 ,\n ")
    assert not automaton.copy().advance(" ")
    assert automaton.advance_text('"b":2}')
    assert automaton.complete


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    automaton = JsonObjectAutomaton(max_depth=3)
    assert automaton.advance_text('{"a":[{')
    assert not automaton.copy().advance("[")
    assert automaton.advance_text("}]}") and automaton.complete


JSON_VALUES: Any = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=5), st.booleans(), st.booleans())
def test_any_serialized_object_is_accepted_character_by_character(
    value: dict[str, Any], indent: bool, ensure_ascii: bool
) -> None:
    text = json.dumps(value, indent=2 if indent else None, ensure_ascii=ensure_ascii)
    automaton = JsonObjectAutomaton(max_depth=64, max_whitespace=64)
    for i, char in enumerate(text):
        assert not automaton.complete
        assert automaton.advance(char), (text, i)
    assert automaton.complete


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), JSON_VALUES, min_size=1, max_size=5), st.randoms())
def test_mutations_that_break_the_document_are_refused_somewhere(
    value: dict[str, Any], rnd: random.Random
) -> None:
    text = json.dumps(value)
    at = rnd.randrange(len(text))
    mutated = text[:at] + rnd.choice('{}[]",:0-.eE tfn\\x\x01') + text[at + rnd.randrange(2) :]
    try:
        parsed: object = json.loads(mutated)
    except ValueError:
        parsed = None
    ok, complete = accepts(mutated)
    # The automaton agrees with the standard parser, modulo json.loads' extensions (NaN, Infinity).
    assert (ok and complete) == isinstance(parsed, dict)


# -- the token choice --------------------------------------------------------------------------

EOS = 0
VOCAB = GuideVocabulary(
    (None, "{", "}", '"', "a", ":", "1", " ", "hello", '{"', '"}', "]", "\n\n\n\n\n\n\n\n\n")
)


def logits_for(preferred: list[int]) -> torch.Tensor:
    """Higher logits for earlier tokens of ``preferred``; the rest far below."""
    row = torch.full((len(VOCAB.texts),), -10.0)
    for rank, token in enumerate(preferred):
        row[token] = 10.0 - rank
    return row


def guide() -> JsonObjectGuide:
    return JsonObjectGuide(VOCAB, (EOS,))


def test_greedy_takes_the_most_likely_token_the_object_allows() -> None:
    g = guide()
    sampler = Sampler.from_params(SamplingParams(temperature=0.0), 0.0)
    # "hello", "]" and the whitespace flood are refused at the start; "{" is next in line.
    assert sample_guided(logits_for([8, 11, 12, 1, 9]), sampler, g, (), ()) == 1
    assert sample_guided(logits_for([4, 2, 3]), sampler, g, (), ()) == 2
    assert g.complete
    # Once the object is closed, the end-of-sequence token comes whatever the model prefers.
    assert sample_guided(logits_for([1, 2, 3]), sampler, g, (), ()) == EOS


def test_sampling_draws_only_allowed_tokens() -> None:
    for seed in range(20):
        g = guide()
        sampler = Sampler.from_params(SamplingParams(temperature=1.0, seed=seed), 1.0)
        text = ""
        for _ in range(12):
            token = sample_guided(torch.zeros(len(VOCAB.texts)), sampler, g, (), ())
            if token == EOS:
                break
            text += VOCAB.texts[token] or ""
        assert accepts(text)[0], text
        assert not g.complete or isinstance(json.loads(text), dict)


def test_sampling_falls_back_to_the_best_allowed_token_when_the_filtered_ones_are_refused() -> None:
    g = guide()
    # top_k=1 leaves only "hello", which cannot start the document.
    sampler = Sampler.from_params(SamplingParams(temperature=1.0, top_k=1, seed=1), 1.0)
    assert sample_guided(logits_for([8, 9, 1]), sampler, g, (), ()) == 9
