"""Structured output requests: OpenAI ``response_format`` and the Responses API ``text.format``.

A request either leaves the output free (``None``) or asks for guided decoding of a JSON object,
optionally against a JSON Schema. Schemas come from clients and are handed to engines whose
grammar compilers are not built for hostile input, so they are bounded here: serialized size,
nesting depth and the number of properties. Every walk over a client's document is iterative,
so no document can exhaust the interpreter's stack. When ``jsonschema`` is importable (it is a
development dependency, not a runtime one), schemas are also checked against their metaschema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from tokenyard.common.errors import InvalidArgument

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_PROPERTIES = 1024
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")

GuidedKind = Literal["json_object", "json_schema"]


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """What the engine must constrain the output to.

    ``schema_json`` is the compact serialization of the schema (key order kept, since it is the
    order an engine generates properties in); it is set exactly when ``kind`` is ``json_schema``.
    """

    kind: GuidedKind
    schema_json: str | None = None
    name: str | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    max_bytes: int = MAX_SCHEMA_BYTES
    max_depth: int = MAX_SCHEMA_DEPTH
    max_properties: int = MAX_SCHEMA_PROPERTIES


def parse_response_format(
    obj: object, *, limits: SchemaLimits = SchemaLimits(), path: str = "response_format"
) -> GuidedDecoding | None:
    """Validate a chat/completions ``response_format``; ``None`` when the output is free text."""
    return _parse_format(obj, path, limits, flat=False)


def parse_text_format(
    obj: object, *, limits: SchemaLimits = SchemaLimits(), path: str = "text.format"
) -> GuidedDecoding | None:
    """Validate a Responses API ``text.format``: like ``response_format`` with the
    ``json_schema`` fields (``name``, ``schema``, ``strict``) flattened into it."""
    return _parse_format(obj, path, limits, flat=True)


def _parse_format(obj: object, path: str, limits: SchemaLimits, *, flat: bool) -> GuidedDecoding | None:
    if obj is None:
        return None
    fmt = _object(obj, path)
    kind = _type(fmt, path)
    if kind is None:
        return None
    if kind == "json_object":
        return GuidedDecoding(kind="json_object")
    if flat:
        return _json_schema(fmt, path, limits)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{path}.json_schema: is required and must be an object")
    return _json_schema(spec, f"{path}.json_schema", limits)


def check_schema(schema: object, path: str, limits: SchemaLimits = SchemaLimits()) -> str:
    """Compact serialization of a client's JSON Schema, after checking it is a bounded JSON
    object with only local ``$ref`` values (and, with ``jsonschema``, a valid schema)."""
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{path}: must be a JSON object")
    _walk(schema, path, max_depth=limits.max_depth, max_nodes=limits.max_bytes, limits=limits)
    text = _serialize(schema, path, limits.max_bytes)
    problem = _metaschema_problem(schema)
    if problem is not None:
        raise InvalidArgument(f"{path}: not a valid JSON Schema: {problem}")
    return text


def check_json_size(value: object, path: str, *, max_bytes: int, max_depth: int) -> str:
    """Compact serialization of any client JSON value bounded in size and nesting."""
    _walk(value, path, max_depth=max_depth, max_nodes=max_bytes, limits=None)
    return _serialize(value, path, max_bytes)


def json_conforms(text: str, guided: GuidedDecoding) -> str | None:
    """Why a finished output does not honour ``guided``, or ``None`` if it does.

    Without ``jsonschema`` a ``json_schema`` output is only checked to be JSON. Schema keywords
    such as ``pattern`` run Python regular expressions on the output; callers that verify
    outputs under untrusted schemas should bound the output length they check.
    """
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        return f"output is not valid JSON: {err}"
    if guided.kind == "json_object":
        return None if isinstance(value, dict) else "output is not a JSON object"
    if guided.schema_json is None:
        return None
    try:
        from jsonschema import exceptions, validators
        from referencing.exceptions import Unresolvable
    except ImportError:
        return None
    schema = json.loads(guided.schema_json)
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        error = exceptions.best_match(cls(schema).iter_errors(value))
    except Unresolvable as err:
        return f"schema reference cannot be resolved: {err}"
    except RecursionError:
        return "validation recursed too deeply (a self-referencing schema or a deeply nested output)"
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"output does not match the schema at '/{where}': {error.message}"


def _object(obj: object, path: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{path}: must be an object")
    return obj


def _type(fmt: dict[str, Any], path: str) -> GuidedKind | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object"
    if kind == "json_schema":
        return "json_schema"
    raise InvalidArgument(f"{path}.type: must be one of 'text', 'json_object', 'json_schema', got {kind!r}")


def _json_schema(spec: dict[str, Any], path: str, limits: SchemaLimits) -> GuidedDecoding:
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(f"{path}.name: is required and must match ^[a-zA-Z0-9_-]{{1,64}}$")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidArgument(f"{path}.description: must be a string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidArgument(f"{path}.strict: must be a boolean")
    if "schema" not in spec:
        raise InvalidArgument(f"{path}.schema: is required")
    schema_json = check_schema(spec["schema"], f"{path}.schema", limits)
    return GuidedDecoding(kind="json_schema", schema_json=schema_json, name=name, strict=bool(strict))


def _walk(value: object, path: str, *, max_depth: int, max_nodes: int, limits: SchemaLimits | None) -> None:
    """Bound nesting depth (and, for a schema, the properties and references) of a document.

    Every JSON value takes at least one byte once serialized, so more nodes than ``max_nodes``
    (the byte budget) already means too large: the walk stops there instead of touching a
    document of any size. With ``limits`` the document is a schema; a value under a
    ``properties`` keyword is a map from property names to subschemas.
    """
    # (value, depth of its container, whether it is a properties map)
    stack: list[tuple[object, int, bool]] = [(value, 0, False)]
    nodes = 0
    properties = 0
    while stack:
        item, depth, is_properties = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise InvalidArgument(f"{path}: larger than the limit of {max_nodes} bytes")
        if isinstance(item, list):
            depth += 1
            if depth > max_depth:
                raise InvalidArgument(f"{path}: nested deeper than the limit of {max_depth} levels")
            stack.extend((v, depth, False) for v in item)
        elif isinstance(item, dict):
            depth += 1
            if depth > max_depth:
                raise InvalidArgument(f"{path}: nested deeper than the limit of {max_depth} levels")
            if limits is None:
                stack.extend((v, depth, False) for v in item.values())
                continue
            if is_properties:
                properties += len(item)
                if properties > limits.max_properties:
                    raise InvalidArgument(
                        f"{path}: more than the limit of {limits.max_properties} properties in all"
                    )
                stack.extend((v, depth, False) for v in item.values())
                continue
            _check_schema_keywords(item, path)
            stack.extend((v, depth, k == "properties") for k, v in item.items())


def _check_schema_keywords(item: dict[str, Any], path: str) -> None:
    ref = item.get("$ref")
    # Engines and validators must never fetch a URL a client named.
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise InvalidArgument(f"{path}: only local references ('#...') are supported, got $ref {ref!r:.80}")
    dialect = item.get("$schema")
    if dialect is not None and not isinstance(dialect, str):
        raise InvalidArgument(f"{path}: $schema must be a string")


def _serialize(value: object, path: str, max_bytes: int) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"{path}: not serializable as JSON: {err}") from None
    size = len(text.encode())
    if size > max_bytes:
        raise InvalidArgument(f"{path}: {size} bytes serialized, over the limit of {max_bytes}")
    return text


def _metaschema_problem(schema: dict[str, Any]) -> str | None:
    try:
        from jsonschema import exceptions, validators
    except ImportError:
        return None
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    error = exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"at '/{where}': {error.message}"
