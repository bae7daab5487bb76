"""response_format and text.format validation, schema limits, and output conformance."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.response_format import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_PROPERTIES,
    GuidedDecoding,
    SchemaLimits,
    json_conforms,
    parse_response_format,
    parse_text_format,
)

pytestmark = pytest.mark.unit

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def json_schema(schema: object, name: object = "person", **extra: object) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, **extra}}


def nested(depth: int) -> dict[str, Any]:
    """A schema document nesting ``depth`` objects (the schema itself is level 1)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"not": schema}
    return schema


def test_text_and_absent_mean_free_output() -> None:
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_text_format(None) is None
    assert parse_text_format({"type": "text"}) is None


def test_json_object() -> None:
    assert parse_response_format({"type": "json_object"}) == GuidedDecoding(kind="json_object")
    assert parse_text_format({"type": "json_object"}) == GuidedDecoding(kind="json_object")


def test_json_schema_keeps_key_order_and_unicode() -> None:
    schema = {"type": "object", "properties": {"zeta": {"const": "é"}, "alpha": {"type": "number"}}}
    guided = parse_response_format(json_schema(schema, strict=True))
    assert guided == GuidedDecoding(
        kind="json_schema",
        schema_json='{"type":"object","properties":{"zeta":{"const":"é"},"alpha":{"type":"number"}}}',
        name="person",
        strict=True,
    )


def test_responses_api_flat_shape() -> None:
    guided = parse_text_format({"type": "json_schema", "name": "person", "schema": PERSON, "strict": False})
    assert guided is not None
    assert guided.kind == "json_schema"
    assert guided.name == "person"
    assert guided.schema_json is not None
    assert json.loads(guided.schema_json) == PERSON
    assert not guided.strict


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ("json_object", r"^response_format: must be an object$"),
        ({}, r"response_format.type: must be one of"),
        ({"type": "json"}, r"response_format.type: must be one of .*'json'"),
        ({"type": "json_schema"}, r"response_format.json_schema: is required"),
        ({"type": "json_schema", "json_schema": "{}"}, r"response_format.json_schema: is required"),
        (json_schema(PERSON, name=None), r"response_format.json_schema.name: is required"),
        (json_schema(PERSON, name="has space"), r"response_format.json_schema.name: .*must match"),
        (json_schema(PERSON, name="n" * 65), r"response_format.json_schema.name"),
        (json_schema(PERSON, name=""), r"response_format.json_schema.name"),
        (json_schema(PERSON, strict="true"), r"response_format.json_schema.strict: must be a boolean"),
        (json_schema(PERSON, description=1), r"response_format.json_schema.description: must be a string"),
        (
            {"type": "json_schema", "json_schema": {"name": "x"}},
            r"response_format.json_schema.schema: is required",
        ),
        (json_schema([PERSON]), r"response_format.json_schema.schema: must be a JSON object"),
        (json_schema(True), r"response_format.json_schema.schema: must be a JSON object"),
        (json_schema('{"type": "object"}'), r"response_format.json_schema.schema: must be a JSON object"),
        (json_schema({"type": "objekt"}), r"response_format.json_schema.schema: not a valid JSON Schema"),
        (json_schema({"properties": {"a": {"minimum": "0"}}}), r"not a valid JSON Schema: at '/properties/a"),
        (json_schema({"$ref": "http://127.0.0.1/s.json"}), r"only local references"),
        (json_schema({"properties": {"a": {"$ref": 3}}}), r"only local references"),
        (json_schema({"$schema": {"x": 1}}), r"\$schema must be a string"),
        (json_schema({"const": float("nan")}), r"not serializable as JSON"),
    ],
)
def test_invalid_response_format_names_the_field(obj: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_response_format(obj)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], r"^text.format: must be an object$"),
        ({"type": "json_schema", "schema": PERSON}, r"text.format.name: is required"),
        ({"type": "json_schema", "name": "p"}, r"text.format.schema: is required"),
        ({"type": "json_schema", "name": "p", "schema": 1}, r"text.format.schema: must be a JSON object"),
    ],
)
def test_invalid_text_format_names_the_field(obj: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_text_format(obj)


def test_local_references_and_defs_are_fine() -> None:
    schema = {
        "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
        "$ref": "#/$defs/node",
    }
    assert parse_response_format(json_schema(schema)) is not None


def test_a_property_named_like_a_keyword_is_just_a_property() -> None:
    schema = {"type": "object", "properties": {"$ref": {"type": "string"}, "properties": {"type": "object"}}}
    assert parse_response_format(json_schema(schema)) is not None


def test_depth_limit_is_exact() -> None:
    assert parse_response_format(json_schema(nested(MAX_SCHEMA_DEPTH))) is not None
    with pytest.raises(InvalidArgument, match=f"nested deeper than the limit of {MAX_SCHEMA_DEPTH} levels"):
        parse_response_format(json_schema(nested(MAX_SCHEMA_DEPTH + 1)))


def test_hostile_depth_is_refused_without_recursion() -> None:
    deep: Any = {"type": "string"}
    for _ in range(200_000):
        deep = {"items": deep}
    with pytest.raises(InvalidArgument, match="nested deeper"):
        parse_response_format(json_schema(deep))
    bomb: Any = []
    for _ in range(200_000):
        bomb = [bomb]
    with pytest.raises(InvalidArgument, match="nested deeper"):
        parse_response_format(json_schema({"enum": bomb}))


def test_size_limit() -> None:
    padding = MAX_SCHEMA_BYTES - len('{"description":""}')
    assert parse_response_format(json_schema({"description": "d" * padding})) is not None
    with pytest.raises(InvalidArgument, match=f"over the limit of {MAX_SCHEMA_BYTES}"):
        parse_response_format(json_schema({"description": "d" * (padding + 1)}))
    # Bytes, not characters.
    with pytest.raises(InvalidArgument, match="bytes serialized"):
        parse_response_format(json_schema({"description": "é" * (padding // 2 + 1)}))


def test_huge_documents_stop_the_walk_early() -> None:
    wide = {"enum": list(range(1_000_000))}
    with pytest.raises(InvalidArgument, match=f"larger than the limit of {MAX_SCHEMA_BYTES} bytes"):
        parse_response_format(json_schema(wide))


def test_property_count_limit_counts_every_properties_map() -> None:
    half = MAX_SCHEMA_PROPERTIES // 2
    ok = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {f"a{i}": {} for i in range(half - 2)}},
            "b": {"type": "object", "properties": {f"b{i}": {} for i in range(half)}},
        },
    }
    assert parse_response_format(json_schema(ok)) is not None
    ok["properties"]["a"]["properties"]["one_more"] = {}  # type: ignore[index]
    with pytest.raises(InvalidArgument, match=f"more than the limit of {MAX_SCHEMA_PROPERTIES} properties"):
        parse_response_format(json_schema(ok))


def test_limits_are_parameters() -> None:
    limits = SchemaLimits(max_bytes=100, max_depth=3, max_properties=2)
    with pytest.raises(InvalidArgument, match="limit of 2 properties"):
        parse_response_format(json_schema({"properties": {"a": {}, "b": {}, "c": {}}}), limits=limits)
    with pytest.raises(InvalidArgument, match="limit of 3 levels"):
        parse_text_format({"type": "json_schema", "name": "n", "schema": nested(4)}, limits=limits)
    with pytest.raises(InvalidArgument, match="over the limit of 100"):
        parse_response_format(json_schema({"description": "x" * 100}), limits=limits)


# -- conformance --------------------------------------------------------------------------------


def person() -> GuidedDecoding:
    guided = parse_response_format(json_schema(PERSON))
    assert guided is not None
    return guided


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"a": 1}', None),
        (' \n{"a": [1, {}]}\n', None),
        ("[1]", "not a JSON object"),
        ('"x"', "not a JSON object"),
        ('{"a": 1', "not valid JSON"),
        ("", "not valid JSON"),
        ('```json\n{"a": 1}\n```', "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
)
def test_json_object_conformance(text: str, problem: str | None) -> None:
    result = json_conforms(text, GuidedDecoding(kind="json_object"))
    if problem is None:
        assert result is None
    else:
        assert result is not None
        assert problem in result


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"name": "Ada", "age": 36}', None),
        ('{"name": "Ada"}', "'age' is a required property"),
        ('{"name": "Ada", "age": -1}', "at '/age'"),
        ('{"name": "Ada", "age": 1, "x": 0}', "Additional properties"),
        ('{"name": "Ada", "age": "36"}', "at '/age'"),
        ("[]", "is not of type 'object'"),
        ("nope", "not valid JSON"),
    ],
)
def test_json_schema_conformance(text: str, problem: str | None) -> None:
    result = json_conforms(text, person())
    if problem is None:
        assert result is None
    else:
        assert result is not None
        assert problem in result


def test_conformance_survives_self_referencing_schemas_and_deep_outputs() -> None:
    loop = parse_response_format(json_schema({"$ref": "#"}))
    assert loop is not None
    result = json_conforms("{}", loop)
    assert result is not None
    assert "recursed too deeply" in result
    tree = parse_response_format(json_schema({"type": "array", "items": {"$ref": "#"}}))
    assert tree is not None
    assert json_conforms("[[[]]]", tree) is None
    deep = "[" * 400 + "]" * 400
    result = json_conforms(deep, tree)
    assert result is not None
    assert "recursed too deeply" in result


def test_unresolvable_local_reference_is_reported() -> None:
    guided = parse_response_format(json_schema({"$ref": "#/$defs/missing"}))
    assert guided is not None
    result = json_conforms("{}", guided)
    assert result is not None
    assert "cannot be resolved" in result
