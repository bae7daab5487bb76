"""The Responses API layer: bodies to chat messages, and the response object and its events."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.generation import Endpoint, FinishReason, Usage
from tokenyard.frontend.responses_api import FunctionCall, ResponsesWriter, parse_responses

pytestmark = pytest.mark.unit


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        kind_line, data_line = block.split("\n")
        doc = json.loads(data_line.removeprefix("data: "))
        assert kind_line == f"event: {doc['type']}"
        out.append(doc)
    return out


def test_input_items_become_chat_messages() -> None:
    parsed = parse_responses(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Weather in "},
                        {"type": "input_text", "text": "Paris?"},
                    ],
                },
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "weather",
                    "arguments": '{"city":"Paris"}',
                },
                {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
            ],
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
            "max_output_tokens": 7,
            "some_future_field": 1,
        }
    )
    g = parsed.generation
    assert g.endpoint is Endpoint.RESPONSES and g.stop.max_tokens == 7
    assert g.messages is not None
    roles = [m["role"] for m in g.messages]
    assert roles == ["system", "system", "user", "assistant", "tool"]
    assert g.messages[2]["content"] == "Weather in Paris?"
    assert [c["id"] for c in g.messages[3]["tool_calls"]] == ["c1", "c2"]
    assert g.messages[4] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert parsed.tools == [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "m", "input": ""}, "input: must not be empty"),
        ({"model": "m", "input": []}, "input: must not be empty"),
        ({"model": "m", "input": "hi", "previous_response_id": "resp_1"}, "does not store responses"),
        ({"model": "m", "input": "hi", "background": True}, "background"),
        ({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}, "only function tools"),
        ({"model": "m", "input": [{"role": "wizard", "content": "hi"}]}, "input.0.role"),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input.0.content.0",
        ),
        ({"model": "m", "input": [{"type": "computer_call"}]}, "input.0.type"),
        ({"model": "m", "input": [{"role": "system", "content": "x"}]}, "no user or assistant"),
        ({"model": "m", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "hi", "temperature": 3}, "temperature"),
        ({"input": "hi"}, "model"),
        ({"model": "m", "input": "hi", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"model": "m", "input": "hi", "metadata": {"k": "v" * 513}}, "metadata.k"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_bodies_are_refused_with_the_field(body: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        parse_responses(body)


def _writer() -> ResponsesWriter:
    return ResponsesWriter(parse_responses({"model": "m", "input": "hi", "metadata": {"k": "v"}}), "abc")


def test_stream_of_reasoning_text_and_a_call_is_well_formed() -> None:
    w = _writer()
    raw = w.start() + w.reasoning("think ") + w.reasoning("hard") + w.text("Hel") + w.text("lo")
    raw += w.function_call(FunctionCall("call_1", "weather", '{"city":"Paris"}'))
    raw += w.finish(FinishReason.STOP, Usage(5, 9, 2))
    evs = events(raw)
    # Strictly what the openai package's types accept, every event.
    for ev in evs:
        TypeAdapter(ResponseStreamEvent).validate_python(ev)
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert [e["type"] for e in evs] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = evs[-1]["response"]
    assert final["status"] == "completed" and final["metadata"] == {"k": "v"} and final["store"] is False
    reasoning, message, call = final["output"]
    assert reasoning["content"][0]["text"] == "think hard"
    assert message["content"][0]["text"] == "Hello" and message["status"] == "completed"
    assert call["call_id"] == "call_1" and call["arguments"] == '{"city":"Paris"}'
    assert final["usage"] == {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
        "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 14,
    }
    # Item ids match between their added, delta and done events.
    added = [e["item"]["id"] for e in evs if e["type"] == "response.output_item.added"]
    done = [e["item"]["id"] for e in evs if e["type"] == "response.output_item.done"]
    assert added == done == [item["id"] for item in final["output"]]


def test_an_output_cut_by_the_limit_is_incomplete_and_an_empty_one_still_has_its_message() -> None:
    w = _writer()
    evs = events(w.start() + w.finish(FinishReason.LENGTH, Usage(3, 0)))
    assert evs[-1]["type"] == "response.incomplete"
    final = evs[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["type"] for item in final["output"]] == ["message"]


def test_an_error_mid_stream_closes_the_open_item_and_fails_the_response() -> None:
    w = _writer()
    evs = events(w.start() + w.text("partial") + w.fail("service_unavailable", "the worker went away"))
    # Every event is one the openai package can read.
    for ev in evs:
        TypeAdapter(ResponseStreamEvent).validate_python(ev)
    assert [e["type"] for e in evs[-4:]] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ]
    final = evs[-1]["response"]
    assert final["status"] == "failed"
    assert final["error"] == {
        "code": "server_error",
        "message": "the worker went away",
        "type": "service_unavailable",
    }


def test_the_whole_object_orders_reasoning_message_and_calls() -> None:
    w = _writer()
    doc = w.full("", "why", [FunctionCall("c", "f", "{}")], FinishReason.STOP, Usage(1, 2))
    assert [item["type"] for item in doc["output"]] == ["reasoning", "function_call"]
    Response.model_validate(doc)
    doc = _writer().full("answer", "", [], FinishReason.STOP, Usage(1, 2))
    Response.model_validate(doc)
    assert doc["output"][0]["content"][0]["text"] == "answer" and doc["status"] == "completed"
