"""Hermes tool calls: parsing (one-shot and streaming), and validation of tools and tool_choice."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Collection
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.tool_calls import (
    MAX_TOOL_JSON_BYTES,
    MAX_TOOLS,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    ToolChoice,
    new_tool_call_id,
    parse_tool_calls,
    tool_names,
    validate_tool_choice,
    validate_tools,
)

pytestmark = pytest.mark.unit


def counter_ids() -> Callable[[], str]:
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


def call(name: str, arguments: object) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def stream(chunks: list[str], valid_names: Collection[str] | None = None) -> tuple[str, list[ToolCallDelta]]:
    parser = ToolCallStreamParser(valid_names=valid_names, id_factory=counter_ids())
    content: list[str] = []
    deltas: list[ToolCallDelta] = []
    for chunk in chunks:
        c, d = parser.feed(chunk)
        content.append(c)
        deltas += d
    c, d = parser.flush()
    deltas += d
    assert parser.call_count == len(deltas)
    return "".join(content) + c, deltas


def as_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Whole calls from OpenAI-shaped deltas, merged by index as a client does."""
    merged: dict[int, dict[str, str]] = {}
    for d in deltas:
        entry = merged.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        if d.id is not None:
            entry["id"] = d.id
        if d.name is not None:
            entry["name"] = d.name
        entry["arguments"] += d.arguments
    return [ToolCall(**merged[i]) for i in sorted(merged)]


def one_shot(text: str, valid_names: Collection[str] | None = None) -> tuple[str, list[ToolCall]]:
    return parse_tool_calls(text, valid_names=valid_names, id_factory=counter_ids())


def test_one_call_with_content_before_it() -> None:
    text = "Let me check.\n" + call("get_weather", {"city": "Zürich", "unit": "c"})
    content, calls = one_shot(text)
    assert content == "Let me check.\n"
    assert calls == [ToolCall("call_0", "get_weather", '{"city": "Zürich", "unit": "c"}')]
    assert stream(list(text)) == (content, [ToolCallDelta(0, "call_0", "get_weather", calls[0].arguments)])


def test_several_calls_in_order_and_separating_whitespace_dropped() -> None:
    text = call("a", {"x": 1}) + "\n\n" + call("b", {}) + "\n"
    content, calls = one_shot(text)
    assert content == ""
    assert [(c.name, c.arguments) for c in calls] == [("a", '{"x": 1}'), ("b", "{}")]
    content, deltas = stream([text])
    assert content == ""
    assert [d.index for d in deltas] == [0, 1]


def test_text_after_a_call_is_content_without_leading_whitespace() -> None:
    assert one_shot(call("a", {}) + "\n  Done.  ")[0] == "Done.  "


def test_arguments_already_a_string_are_kept_verbatim() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"q\\": 1 }"}</tool_call>'
    assert one_shot(text)[1] == [ToolCall("call_0", "f", '{"q": 1 }')]


@pytest.mark.parametrize(
    ("body", "arguments"),
    [
        ('{"name": "f"}', "{}"),
        ('{"name": "f", "arguments": null}', "{}"),
        ('{"name": "f", "parameters": {"k": "v"}}', '{"k": "v"}'),
        ('{"name": "f", "arguments": {"s": "\\u00e9🙂"}}', '{"s": "é🙂"}'),
    ],
)
def test_argument_forms(body: str, arguments: str) -> None:
    assert one_shot(f"<tool_call>{body}</tool_call>")[1] == [ToolCall("call_0", "f", arguments)]


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        '{"name": "f", "arguments": {"x": 1}',  # truncated
        '["f", {}]',
        '{"arguments": {}}',
        '{"name": 3, "arguments": {}}',
        '{"name": "", "arguments": {}}',
        '{"name": "f", "arguments": [1, 2]}',
        '{"name": "f", "arguments": 1e999}',
        '{"name": "f", "arguments": {"x": 1e999}}',  # would re-serialize as Infinity
        '{"name": "f", "arguments": {"x": NaN}}',
        '{"name": "f", "arguments": {"x": ' + "9" * 5000 + "}}",  # over Python's int digit limit
        '{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}",  # nesting bomb
        '{"name": "f", "arguments": ' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}",
        "",
        "<tool_call>" + '{"name": "f"}',  # nested start tag
    ],
)
def test_a_block_that_is_not_a_call_stays_in_the_content_verbatim(body: str) -> None:
    text = "before " + f"<tool_call>{body}</tool_call>" + "\n after"
    assert one_shot(text) == (text, [])
    assert stream([text[i : i + 7] for i in range(0, len(text), 7)]) == (text, [])


def test_valid_names_are_optional() -> None:
    text = call("unknown", {})
    assert [c.name for c in one_shot(text)[1]] == ["unknown"]
    assert one_shot(text, valid_names={"known"}) == (text, [])
    assert stream([text], valid_names={"known"}) == (text, [])
    assert [c.name for c in one_shot(text, valid_names={"unknown"})[1]] == ["unknown"]


def test_unclosed_block_is_a_call_if_its_text_is_one() -> None:
    text = 'Sure. <tool_call>{"name": "f", "arguments": {"a": 1}}'
    assert one_shot(text) == ("Sure. ", [ToolCall("call_0", "f", '{"a": 1}')])
    assert stream(list(text)) == ("Sure. ", [ToolCallDelta(0, "call_0", "f", '{"a": 1}')])
    cut = 'Sure. <tool_call>{"name": "f", "argu'
    assert one_shot(cut) == (cut, [])
    assert stream(list(cut)) == (cut, [])


def test_stray_end_tag_and_lookalike_tags_are_content() -> None:
    text = "</tool_call> <tool_calls> <tool_cal"
    assert one_shot(text) == (text, [])
    assert stream(list(text)) == (text, [])


def test_content_streams_holding_back_only_a_partial_start_tag() -> None:
    parser = ToolCallStreamParser(id_factory=counter_ids())
    assert parser.feed("Checking") == ("Checking", [])
    assert parser.feed(" now <tool") == (" now ", [])
    assert parser.feed('_call>{"name": "f", ') == ("", [])
    assert parser.feed('"arguments": {}}</tool_') == ("", [])
    assert parser.feed("call>\n") == ("", [ToolCallDelta(0, "call_0", "f", "{}")])
    assert parser.call_count == 1
    assert parser.feed("<tooltip") == ("<tooltip", [])
    assert parser.flush() == ("", [])


def test_long_block_in_tiny_chunks() -> None:
    arguments = {"text": "x" * 200_000}
    text = call("write", arguments)
    content, deltas = stream([text[i : i + 2] for i in range(0, len(text), 2)])
    assert content == ""
    assert json.loads(deltas[0].arguments) == arguments


def test_ids_look_like_openai_ids_and_differ() -> None:
    ids = {new_tool_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    _, calls = parse_tool_calls(call("a", {}) + call("b", {}))
    assert calls[0].id != calls[1].id


def test_openai_shapes() -> None:
    assert ToolCall("call_1", "f", "{}").to_openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
    }
    assert ToolCallDelta(0, "call_1", "f", "").to_openai() == {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert ToolCallDelta(2, arguments='{"a"').to_openai() == {"index": 2, "function": {"arguments": '{"a"'}}


FRAGMENTS = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        "<tool_",
        "</tool",
        "<",
        ">",
        "\n",
        " ",
        "hi",
        "é🙂",
        '{"name": "f", "arguments": {"a": [1, "ü"]}}',
        '{"name": "g"}',
        '{"name": "h", "arguments": "raw"}',
        '{"name": ',
        "{",
        "}",
        "null",
        # Whole blocks, so that most examples hold calls next to the noise.
        '<tool_call>\n{"name": "f", "arguments": {"k": "</tool"}}\n</tool_call>',
        '<tool_call>{"name": "h", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "undeclared"}</tool_call>',
        "<tool_call>[1]</tool_call>",
    ]
)


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = "".join(draw(st.lists(FRAGMENTS | st.text(max_size=4), max_size=30)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(split_text(), st.sampled_from([None, {"f", "h"}]))
def test_any_split_gives_the_one_shot_parse(case: tuple[str, list[str]], valid: set[str] | None) -> None:
    text, chunks = case
    content, deltas = stream(chunks, valid_names=valid)
    assert (content, as_calls(deltas)) == one_shot(text, valid_names=valid)
    # The first delta of every call carries what OpenAI clients need to start it.
    for d in deltas:
        assert d.id is not None
        assert d.name is not None


# -- validation ---------------------------------------------------------------------------------


def tool(name: str = "get_weather", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


def test_valid_tools_pass_through() -> None:
    tools = [
        tool(
            description="Weather.", parameters={"type": "object", "properties": {"city": {"type": "string"}}}
        ),
        tool("no-params_2", strict=True),
    ]
    assert validate_tools(tools) == tools
    assert tool_names(tools) == {"get_weather", "no-params_2"}
    assert validate_tools(None) == []
    assert validate_tools([]) == []


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ({"type": "function"}, "tools: must be an array"),
        ([tool(), "x"], "tools.1: must be an object"),
        ([{"type": "retrieval", "function": {"name": "f"}}], "tools.0.type: must be 'function'"),
        ([{"type": "function"}], "tools.0.function: is required"),
        ([tool(""), tool()], "tools.0.function.name"),
        ([tool(), tool(), tool("a b")], "tools.1.function.name: duplicate"),
        ([tool(), tool(), tool("a b")][::2], "tools.1.function.name: is required and must match"),
        ([tool("x" * 65)], "tools.0.function.name"),
        ([tool("ünïcode")], "tools.0.function.name"),
        ([tool(description=3)], "tools.0.function.description: must be a string"),
        ([tool(strict="yes")], "tools.0.function.strict: must be a boolean"),
        ([tool(parameters=[])], "tools.0.function.parameters: must be a JSON object"),
        ([tool(parameters="{}")], "tools.0.function.parameters: must be a JSON object"),
        ([tool(parameters={"$ref": "https://example.com/s.json"})], "only local references"),
        ([tool(parameters={"type": 12})], "tools.0.function.parameters: not a valid JSON Schema"),
        ([tool()] * (MAX_TOOLS + 1), f"at most {MAX_TOOLS} tools"),
        ([tool(description="d" * MAX_TOOL_JSON_BYTES)], "tools.0: .*over the limit of 65536"),
        ([tool(description="é" * (MAX_TOOL_JSON_BYTES // 2))], "tools.0: .*bytes serialized"),
        ([{**tool(), "extra": [[[[[[]]]]]] * 20_000}], "tools.0: larger than the limit"),
    ],
)
def test_invalid_tools_name_the_field(tools: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_tools(tools)


def test_deep_tool_is_refused_without_recursion() -> None:
    deep: Any = {}
    for _ in range(100_000):
        deep = {"type": "object", "properties": {"p": deep}}
    with pytest.raises(InvalidArgument, match=r"tools.0: nested deeper"):
        validate_tools([tool(parameters=deep)])
    bomb: Any = []
    for _ in range(100_000):
        bomb = [bomb]
    with pytest.raises(InvalidArgument, match=r"tools.0: nested deeper"):
        validate_tools([{**tool(), "x": bomb}])


@pytest.mark.parametrize(
    ("choice", "tools", "expected"),
    [
        (None, [tool()], ToolChoice("auto")),
        (None, [], ToolChoice("none")),
        ("auto", [tool()], ToolChoice("auto")),
        ("auto", [], ToolChoice("none")),
        ("none", [tool()], ToolChoice("none")),
        ("none", [], ToolChoice("none")),
        ("required", [tool()], ToolChoice("required")),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            [tool()],
            ToolChoice("function", "get_weather"),
        ),
    ],
)
def test_tool_choice(choice: object, tools: list[dict[str, Any]], expected: ToolChoice) -> None:
    assert validate_tool_choice(choice, tools) == expected


@pytest.mark.parametrize(
    ("choice", "tools", "message"),
    [
        ("required", [], "tool_choice: 'required' needs"),
        ("any", [tool()], "tool_choice: must be"),
        (3, [tool()], "tool_choice: must be"),
        ({"type": "tool", "function": {"name": "get_weather"}}, [tool()], "tool_choice.type"),
        ({"type": "function"}, [tool()], "tool_choice.function: is required"),
        ({"type": "function", "function": {}}, [tool()], "tool_choice.function.name: is required"),
        ({"type": "function", "function": {"name": "other"}}, [tool()], "'other' is not a tool declared"),
        ({"type": "function", "function": {"name": "get_weather"}}, [], "is not a tool declared"),
    ],
)
def test_invalid_tool_choice(choice: object, tools: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_tool_choice(choice, tools)


def test_whitespace_after_a_call_is_dropped_across_chunks() -> None:
    parser = ToolCallStreamParser(id_factory=counter_ids())
    _, deltas = parser.feed('<tool_call>{"name": "f"}</tool_call>')
    assert [d.name for d in deltas] == ["f"]
    assert parser.feed("\n") == ("", [])
    assert parser.feed(" \n") == ("", [])
    assert parser.feed(" Done") == ("Done", [])
    assert parser.feed(" now") == (" now", [])
