"""Chat output: reasoning first, then tool calls from the content; streaming equals one-shot."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenyard.frontend.chat_output import ChatDelta, ChatOutputParser, parse_chat_output
from tokenyard.frontend.reasoning import ReasoningParser
from tokenyard.frontend.tool_calls import ToolCall, ToolCallDelta, ToolCallStreamParser

pytestmark = pytest.mark.unit

CALL = '<tool_call>\n{"name": "lookup", "arguments": {"q": "ß"}}\n</tool_call>'


def counter_ids() -> Callable[[], str]:
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


def parser(reasoning: bool, tools: bool, starts_in_reasoning: bool = False) -> ChatOutputParser:
    return ChatOutputParser(
        reasoning=ReasoningParser(starts_in_reasoning=starts_in_reasoning) if reasoning else None,
        tools=ToolCallStreamParser(id_factory=counter_ids()) if tools else None,
    )


def stream(p: ChatOutputParser, chunks: list[str]) -> tuple[str, str, list[ToolCall]]:
    deltas = [p.feed(c) for c in chunks] + [p.flush()]
    calls = [ToolCall(d.id or "", d.name or "", d.arguments) for delta in deltas for d in delta.tool_calls]
    return "".join(d.content for d in deltas), "".join(d.reasoning for d in deltas), calls


def test_chat_delta_is_falsy_when_empty() -> None:
    assert not ChatDelta()
    assert ChatDelta(content="x")
    assert ChatDelta(reasoning="x")
    assert ChatDelta(tool_calls=(ToolCallDelta(0, "call_0", "f", "{}"),))


def test_reasoning_then_tool_call() -> None:
    text = "<think>I should look it up. " + CALL + "</think>\n\nOne moment.\n" + CALL
    expected = (
        "One moment.\n",
        "I should look it up. " + CALL,  # a call drafted while thinking is not a call
        [ToolCall("call_0", "lookup", '{"q": "ß"}')],
    )
    assert parse_chat_output(text, reasoning=True, tools=True, id_factory=counter_ids()) == expected
    assert stream(parser(True, True), list(text)) == expected
    assert stream(parser(True, True), [text]) == expected


def test_streaming_shape() -> None:
    p = parser(True, True)
    assert p.feed("<think>hm") == ChatDelta(reasoning="hm")
    assert p.feed("</think>\nOk <tool") == ChatDelta(content="Ok ")
    assert not p.feed('_call>{"name": "f"}')
    assert p.feed("</tool_call>") == ChatDelta(tool_calls=(ToolCallDelta(0, "call_0", "f", "{}"),))
    assert p.tool_call_count == 1
    assert not p.flush()


def test_flush_releases_what_both_parsers_held() -> None:
    p = parser(True, True, starts_in_reasoning=True)
    assert p.feed("thinking </thi") == ChatDelta(reasoning="thinking ")
    assert p.flush() == ChatDelta(reasoning="</thi")
    p = parser(True, True)
    assert p.feed('<think>a</think><tool_call>{"name": "f"}') == ChatDelta(reasoning="a")
    assert p.flush() == ChatDelta(tool_calls=(ToolCallDelta(0, "call_0", "f", "{}"),))
    p = parser(True, True)
    assert p.feed("answer <tool_c") == ChatDelta(content="answer ")
    assert p.flush() == ChatDelta(content="<tool_c")


@pytest.mark.parametrize(("reasoning", "tools"), [(False, False), (True, False), (False, True)])
def test_each_part_can_be_off(reasoning: bool, tools: bool) -> None:
    text = "<think>r</think>c" + CALL
    content, thought, calls = parse_chat_output(
        text, reasoning=reasoning, tools=tools, id_factory=counter_ids()
    )
    assert (thought == "r") is reasoning
    assert bool(calls) is tools
    assert ("<think>" in content) is not reasoning
    assert ("<tool_call>" in content) is not tools
    assert stream(parser(reasoning, tools), list(text)) == (content, thought, calls)
    assert parser(reasoning, tools).tool_call_count == 0


def test_empty_output() -> None:
    assert parse_chat_output("", reasoning=True, tools=True) == ("", "", [])
    assert stream(parser(True, True), []) == ("", "", [])
    assert stream(parser(True, True), ["", "", ""]) == ("", "", [])


def test_unknown_tool_names_can_be_kept_as_content() -> None:
    assert parse_chat_output(CALL, reasoning=False, tools=True, valid_tool_names={"other"}) == (CALL, "", [])


FRAGMENTS = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        '{"name": "f", "arguments": {"a": 1}}',
        CALL,
        "<th",
        "</tool",
        "\n",
        " ",
        "x",
        "ø",
    ]
)


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = "".join(draw(st.lists(FRAGMENTS | st.text(max_size=3), max_size=25)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(split_text(), st.booleans(), st.booleans(), st.booleans())
def test_any_split_gives_the_one_shot_parse(
    case: tuple[str, list[str]], reasoning: bool, tools: bool, starts_in_reasoning: bool
) -> None:
    text, chunks = case
    expected = parse_chat_output(
        text,
        reasoning=reasoning,
        tools=tools,
        starts_in_reasoning=starts_in_reasoning,
        id_factory=counter_ids(),
    )
    assert stream(parser(reasoning, tools, starts_in_reasoning), chunks) == expected
