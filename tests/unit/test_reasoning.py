"""Reasoning separation: one-shot cases, streaming hold-back, and split invariance."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenyard.frontend.reasoning import ReasoningParser, parse_reasoning

pytestmark = pytest.mark.unit


def stream(
    text_chunks: list[str],
    *,
    start_tag: str = "<think>",
    end_tag: str = "</think>",
    starts_in_reasoning: bool = False,
) -> tuple[str, str]:
    parser = ReasoningParser(start_tag=start_tag, end_tag=end_tag, starts_in_reasoning=starts_in_reasoning)
    reasoning: list[str] = []
    content: list[str] = []
    for chunk in text_chunks:
        r, c = parser.feed(chunk)
        reasoning.append(r)
        content.append(c)
    r, c = parser.flush()
    return "".join(reasoning) + r, "".join(content) + c


@pytest.mark.parametrize(
    ("text", "starts_in_reasoning", "expected"),
    [
        # Qwen3: the model opens the block itself.
        ("<think>\nplan\n</think>\n\nAnswer.", False, ("\nplan\n", "Answer.")),
        # DeepSeek-R1: the template opened it.
        ("plan</think>\n\nAnswer.", True, ("plan", "Answer.")),
        # ... and the model repeats the start tag anyway.
        ("<think>plan</think>Answer.", True, ("plan", "Answer.")),
        # Only a start tag at the very beginning is a repeat.
        ("x<think>plan</think>Answer.", True, ("x<think>plan", "Answer.")),
        ("Hi. <think>plan</think>Answer.", False, ("plan", "Hi. Answer.")),
        ("No thinking at all.", False, ("", "No thinking at all.")),
        ("Thinks to the end", True, ("Thinks to the end", "")),
        ("<think>unclosed", False, ("unclosed", "")),
        ("A stray </think> is content", False, ("", "A stray </think> is content")),
        # Nested: the first end tag closes the block.
        ("<think>a<think>b</think>c</think>d", False, ("a<think>b", "c</think>d")),
        # Repeated: there is one block; later tags are content.
        ("<think>a</think>b<think>c</think>", False, ("a", "b<think>c</think>")),
        # Only newlines after the end tag are separators.
        ("<think>r</think>\r\n\n  indented", False, ("r", "  indented")),
        ("<think>r</think>x\n\ny", False, ("r", "x\n\ny")),
        ("<think></think>", False, ("", "")),
        ("", False, ("", "")),
        ("", True, ("", "")),
        ("<think>思考 🙂</think>\n答え", False, ("思考 🙂", "答え")),
        ("<thinking>not the tag</thinking>", False, ("", "<thinking>not the tag</thinking>")),
    ],
)
def test_one_shot_and_streaming_agree(
    text: str, starts_in_reasoning: bool, expected: tuple[str, str]
) -> None:
    assert parse_reasoning(text, starts_in_reasoning=starts_in_reasoning) == expected
    assert stream(list(text), starts_in_reasoning=starts_in_reasoning) == expected
    assert stream([text], starts_in_reasoning=starts_in_reasoning) == expected


def test_content_streams_without_waiting() -> None:
    parser = ReasoningParser()
    assert parser.feed("Hello") == ("", "Hello")
    # Could be the start of <think>: held.
    assert parser.feed(" <th") == ("", " ")
    assert parser.feed("ere") == ("", "<there")


def test_reasoning_streams_and_holds_only_a_partial_end_tag() -> None:
    parser = ReasoningParser()
    assert parser.feed("<think>step one") == ("step one", "")
    assert parser.in_reasoning
    assert parser.feed(" and </thi") == (" and ", "")
    assert parser.feed("nk>\n") == ("", "")
    assert not parser.in_reasoning
    assert parser.feed("\nDone") == ("", "Done")
    assert parser.flush() == ("", "")


def test_missing_end_tag_flushes_held_text_as_reasoning() -> None:
    parser = ReasoningParser(starts_in_reasoning=True)
    assert parser.feed("all of it </thi") == ("all of it ", "")
    assert parser.flush() == ("</thi", "")


def test_partial_repeat_of_the_start_tag_waits_then_goes_to_reasoning() -> None:
    parser = ReasoningParser(starts_in_reasoning=True)
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("s is not it") == ("<this is not it", "")
    parser = ReasoningParser(starts_in_reasoning=True)
    assert parser.feed("<th") == ("", "")
    assert parser.flush() == ("<th", "")


def test_newline_stripping_spans_chunks() -> None:
    parser = ReasoningParser()
    assert parser.feed("<think>r</think>\n") == ("r", "")
    assert parser.feed("\n") == ("", "")
    assert parser.feed("a\n") == ("", "a\n")
    assert parser.feed("\nb") == ("", "\nb")


def test_custom_tags() -> None:
    assert parse_reasoning("[THINK]hmm[/THINK]\nok <think>", start_tag="[THINK]", end_tag="[/THINK]") == (
        "hmm",
        "ok <think>",
    )
    assert stream(list("[THINK]hmm[/THINK]\nok"), start_tag="[THINK]", end_tag="[/THINK]") == ("hmm", "ok")


@pytest.mark.parametrize(("start", "end"), [("", "</think>"), ("<think>", ""), ("<t>", "<t>")])
def test_unusable_tags_are_refused(start: str, end: str) -> None:
    with pytest.raises(ValueError, match="tags"):
        ReasoningParser(start_tag=start, end_tag=end)
    with pytest.raises(ValueError, match="tags"):
        parse_reasoning("x", start_tag=start, end_tag=end)


def test_large_output_in_tiny_chunks_is_linear_enough() -> None:
    text = "<think>" + "why " * 50_000 + "</think>\n" + "answer " * 50_000
    reasoning, content = stream([text[i : i + 3] for i in range(0, len(text), 3)])
    assert reasoning == "why " * 50_000
    assert content == "answer " * 50_000


FRAGMENTS = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<",
        "</",
        "<th",
        "</thi",
        "think>",
        ">",
        "\n",
        "\r",
        " ",
        "a",
        "é",
        "🙂",
        "[/T]",
        "[T]",
    ]
)


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = "".join(draw(st.lists(FRAGMENTS | st.text(max_size=5), max_size=30)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(split_text(), st.booleans(), st.sampled_from([("<think>", "</think>"), ("[T]", "[/T]")]))
def test_any_split_gives_the_one_shot_parse(
    case: tuple[str, list[str]], starts_in_reasoning: bool, tags: tuple[str, str]
) -> None:
    text, chunks = case
    start, end = tags
    expected = parse_reasoning(text, start_tag=start, end_tag=end, starts_in_reasoning=starts_in_reasoning)
    assert stream(chunks, start_tag=start, end_tag=end, starts_in_reasoning=starts_in_reasoning) == expected
    # Nothing is lost but tags and separator newlines.
    assert len(expected[0]) + len(expected[1]) <= len(text)
