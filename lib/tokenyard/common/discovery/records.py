"""What an instance advertises in discovery, and its JSON form.

Records cross process and language boundaries (Redis values, lease files, ``tokenyard status --json``),
so parsing is strict: a record with a missing or mistyped field is rejected as a whole rather than
half understood. Unknown fields are ignored, like unknown protobuf fields, so that a newer release
can add a field without older readers dropping its records during a rolling upgrade.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenyard.common.discovery.errors import InvalidRecordError

MODEL_ROLES = ("aggregated", "prefill", "decode")
STRUCTURED_OUTPUT_KINDS = ("json_object", "json_schema")

# Service names become parts of Redis keys and file names, so they stay clear of ':', '.', '/' and globs.
_SERVICE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_ROLE_RE = re.compile(r"^[A-Za-z0-9_.-]{0,63}$")
_U64_MAX = 2**64 - 1


def new_instance_id() -> int:
    """A random nonzero u64; unique per registration with overwhelming probability."""
    while True:
        value = secrets.randbits(64)
        if value:
            return value


class Metadata(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping, so that instances can be compared and hashed."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self._items == dict(other.items())

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"Metadata({self._items!r})"


def _fail(where: str, message: str) -> InvalidRecordError:
    return InvalidRecordError(f"invalid {where}: {message}")


def _check_int(where: str, name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    # bool is an int subclass; `true` is never a valid count or id.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise _fail(where, f"{name} must be {bound}, got {value}")


def _check_str(where: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"{name} must be a string, got {type(value).__name__}")
    return value


def _check_keys(
    where: str, doc: Mapping[str, Any], required: Iterable[str], optional: Iterable[str] = ()
) -> None:
    # `optional` documents the fields a reader understands; keys beyond them are tolerated
    # (forward compatibility, see the module docstring).
    del optional
    missing = [k for k in required if k not in doc]
    if missing:
        raise _fail(where, f"missing field(s) {', '.join(missing)}")


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What a worker serves; the frontend builds its model list and the router its pools from these."""

    model: str
    tokenizer: str
    block_size: int
    context_length: int
    total_kv_blocks: int
    engine: str
    role: str  # aggregated | prefill | decode
    # How the frontend reads the model's output: "" (plain text), or the name of a parser that
    # separates reasoning ("think": <think>...</think>; "deepseek_r1": the template opened the
    # block) and tool calls ("hermes": <tool_call>{json}</tool_call>).
    reasoning_parser: str = ""
    tool_call_parser: str = ""
    # The kinds of structured output (response_format) the engine can constrain its output to:
    # "json_object", "json_schema"; empty when none. Kinds a reader does not know are kept.
    structured_output: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = "model card"
        kinds = self.structured_output
        if not isinstance(kinds, tuple) or not all(isinstance(k, str) and k for k in kinds):
            raise _fail(where, "structured_output must be a list of non-empty strings")
        for name in ("model", "tokenizer", "engine", "role", "reasoning_parser", "tool_call_parser"):
            _check_str(where, name, getattr(self, name))
        if not self.model:
            raise _fail(where, "model must not be empty")
        if not self.engine:
            raise _fail(where, "engine must not be empty")
        _check_int(where, "block_size", self.block_size, 1)
        _check_int(where, "context_length", self.context_length, 1)
        _check_int(where, "total_kv_blocks", self.total_kv_blocks, 0)
        if self.role not in MODEL_ROLES:
            raise _fail(where, f"role must be one of {', '.join(MODEL_ROLES)}, got {self.role!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "block_size": self.block_size,
            "context_length": self.context_length,
            "total_kv_blocks": self.total_kv_blocks,
            "engine": self.engine,
            "role": self.role,
            "reasoning_parser": self.reasoning_parser,
            "tool_call_parser": self.tool_call_parser,
            "structured_output": list(self.structured_output),
        }

    @classmethod
    def from_dict(cls, doc: object) -> ModelCard:
        if not isinstance(doc, Mapping):
            raise _fail("model card", f"must be an object, got {type(doc).__name__}")
        _check_keys("model card", doc, _CARD_FIELDS, _CARD_OPTIONAL)
        # Cards of older workers lack the optional fields: their defaults apply.
        fields = {k: doc[k] for k in (*_CARD_FIELDS, *_CARD_OPTIONAL) if k in doc}
        if "structured_output" in fields:
            fields["structured_output"] = _structured_output(fields["structured_output"])
        return cls(**fields)


def _structured_output(value: object) -> object:
    # Older workers published a bool, true meaning every kind; anything else stays for
    # __post_init__ to judge.
    if value is True:
        return STRUCTURED_OUTPUT_KINDS
    if value is False:
        return ()
    if isinstance(value, list):
        return tuple(value)
    return value


_CARD_FIELDS = ("model", "tokenizer", "block_size", "context_length", "total_kv_blocks", "engine", "role")
_CARD_OPTIONAL = ("reasoning_parser", "tool_call_parser", "structured_output")
_INSTANCE_REQUIRED = ("instance_id", "service", "role", "address")
_INSTANCE_OPTIONAL = ("metrics_address", "model_card", "metadata")


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered process: how to reach it and what it offers."""

    instance_id: int  # random nonzero u64, unique per registration
    service: str  # frontend | router | planner | worker | gms
    role: str  # service-specific role, "" when none
    address: str  # host:port of the gRPC server, or unix:///path
    metrics_address: str = ""  # host:port of /metrics, "" when none
    model_card: ModelCard | None = None
    metadata: Mapping[str, str] = field(default_factory=Metadata)

    def __post_init__(self) -> None:
        where = "instance record"
        _check_int(where, "instance_id", self.instance_id, 1, _U64_MAX)
        service = _check_str(where, "service", self.service)
        if not _SERVICE_RE.match(service):
            raise _fail(where, f"service must match {_SERVICE_RE.pattern}, got {service!r}")
        role = _check_str(where, "role", self.role)
        if not _ROLE_RE.match(role):
            raise _fail(where, f"role must match {_ROLE_RE.pattern}, got {role!r}")
        address = _check_str(where, "address", self.address)
        if not address or any(c.isspace() for c in address):
            raise _fail(where, f"address must be a non-empty host:port or unix:///path, got {address!r}")
        metrics = _check_str(where, "metrics_address", self.metrics_address)
        if any(c.isspace() for c in metrics):
            raise _fail(where, f"metrics_address must be host:port or empty, got {metrics!r}")
        if self.model_card is not None and not isinstance(self.model_card, ModelCard):
            raise _fail(where, f"model_card must be a ModelCard, got {type(self.model_card).__name__}")
        if not isinstance(self.metadata, Mapping):
            raise _fail(where, f"metadata must be a mapping, got {type(self.metadata).__name__}")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise _fail(where, f"metadata must map strings to strings, got {key!r}: {value!r}")
        if not isinstance(self.metadata, Metadata):
            object.__setattr__(self, "metadata", Metadata(self.metadata))

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "service": self.service,
            "role": self.role,
            "address": self.address,
            "metrics_address": self.metrics_address,
            "model_card": self.model_card.to_dict() if self.model_card is not None else None,
            "metadata": dict(self.metadata),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, doc: object) -> Instance:
        if not isinstance(doc, Mapping):
            raise _fail("instance record", f"must be a JSON object, got {type(doc).__name__}")
        _check_keys("instance record", doc, _INSTANCE_REQUIRED, _INSTANCE_OPTIONAL)
        card_doc = doc.get("model_card")
        metadata = doc.get("metadata", {})
        if not isinstance(metadata, Mapping):
            raise _fail("instance record", f"metadata must be an object, got {type(metadata).__name__}")
        return cls(
            instance_id=doc["instance_id"],
            service=doc["service"],
            role=doc["role"],
            address=doc["address"],
            metrics_address=doc.get("metrics_address", ""),
            model_card=ModelCard.from_dict(card_doc) if card_doc is not None else None,
            metadata=metadata,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Instance:
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRecordError(f"invalid instance record: not JSON ({exc})") from None
        return cls.from_dict(doc)
