"""Tool calls: validating a request's ``tools`` and ``tool_choice``, parsing calls out of the output.

The output format is Hermes', used by the Qwen2.5/Qwen3, Hermes and SmolLM tool templates: each
call is a JSON object ``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and
``</tool_call>``. Text outside the blocks is content; whitespace right after a call is a
separator and is dropped. A block that does not hold a valid call (bad JSON, no name, a name the
caller did not allow) stays in the content as written: the model's output is never lost. A
block left open at the end of the output is still a call if its text is one (a stop string may
have cut the end tag).

:class:`ToolCallStreamParser` buffers each block and emits its call in one delta when the block
ends; content streams as it comes, holding back only what could be the beginning of a start
tag. Its deltas add up to :func:`parse_tool_calls` of the whole text, however it was split.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal

from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.response_format import MAX_SCHEMA_DEPTH, SchemaLimits, check_json_size, check_schema

logger = logging.getLogger(__name__)

START_TAG = "<tool_call>"
END_TAG = "</tool_call>"
MAX_TOOLS = 128
MAX_TOOL_JSON_BYTES = 64 * 1024
# A tool is a small envelope (the tool, its function) around a parameters schema.
MAX_TOOL_DEPTH = MAX_SCHEMA_DEPTH + 2
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete call; ``arguments`` is a JSON string, as OpenAI returns it."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One piece of a streamed call, in OpenAI's streaming shape: the first piece of call
    ``index`` has ``id`` and ``name``; later pieces only append to ``arguments``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function = {"name": self.name, **function}
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        out["function"] = function
        return out


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``mode`` ``function`` forces the call of ``name``; ``none`` also stands for a request
    without tools."""

    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None


def parse_tool_calls(
    text: str,
    *,
    valid_names: Collection[str] | None = None,
    id_factory: Callable[[], str] = new_tool_call_id,
) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of a whole output; with ``valid_names``, a call of any other name
    stays in the content."""
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    after_call = False
    while True:
        s = text.find(START_TAG, pos)
        segment = text[pos:] if s == -1 else text[pos:s]
        content.append(segment.lstrip() if after_call else segment)
        if s == -1:
            break
        body_start = s + len(START_TAG)
        e = text.find(END_TAG, body_start)
        body = text[body_start:] if e == -1 else text[body_start:e]
        parsed = _parse_block(body, valid_names)
        if parsed is not None:
            calls.append(ToolCall(id_factory(), *parsed))
        else:
            content.append(START_TAG + body + ("" if e == -1 else END_TAG))
        if e == -1:
            break
        after_call = parsed is not None
        pos = e + len(END_TAG)
    return "".join(content), calls


class ToolCallStreamParser:
    """Splits streamed content into text and tool call deltas."""

    def __init__(
        self,
        *,
        valid_names: Collection[str] | None = None,
        id_factory: Callable[[], str] = new_tool_call_id,
    ) -> None:
        self._valid_names = valid_names
        self._id_factory = id_factory
        # Outside a block: a possible partial start tag. Inside: the block's text so far, in
        # pieces (joined once, when the block ends) and its last few characters, where an end
        # tag split across chunks begins.
        self._held = ""
        self._in_block = False
        self._pieces: list[str] = []
        self._tail = ""
        self._after_call = False
        self._calls = 0

    @property
    def call_count(self) -> int:
        """Calls emitted so far (a finished request with any has finish reason ``tool_calls``)."""
        return self._calls

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """``(content_delta, tool_call_deltas)`` safe to emit after ``text``."""
        buf = text if self._in_block else self._held + text
        self._held = ""
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if self._in_block:
                ended = self._extend_block(buf)
                if ended is None:
                    break
                body, buf = ended
                delta = self._close_block(body)
                if delta is None:
                    content.append(START_TAG + body + END_TAG)
                else:
                    deltas.append(delta)
                self._after_call = delta is not None
                continue
            if self._after_call:
                buf = buf.lstrip()
                self._after_call = not buf
            i = buf.find(START_TAG)
            if i == -1:
                keep = _partial_tag_len(buf, START_TAG)
                content.append(buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
                break
            content.append(buf[:i])
            buf = buf[i + len(START_TAG) :]
            self._in_block = True
        return "".join(content), deltas

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """What is held at the end of the output: a partial start tag, or an unclosed block."""
        if not self._in_block:
            held, self._held = self._held, ""
            return held, []
        body = "".join(self._pieces)
        self._pieces, self._tail, self._in_block = [], "", False
        delta = self._close_block(body)
        if delta is None:
            return START_TAG + body, []
        return "", [delta]

    def _extend_block(self, text: str) -> tuple[str, str] | None:
        """``(body, text after the end tag)`` once ``text`` ends the open block."""
        window = self._tail + text
        i = window.find(END_TAG)
        if i == -1:
            self._pieces.append(text)
            self._tail = window[-(len(END_TAG) - 1) :]
            return None
        full = "".join(self._pieces) + text
        end = len(full) - len(window) + i
        self._pieces, self._tail, self._in_block = [], "", False
        return full[:end], full[end + len(END_TAG) :]

    def _close_block(self, body: str) -> ToolCallDelta | None:
        parsed = _parse_block(body, self._valid_names)
        if parsed is None:
            return None
        name, arguments = parsed
        delta = ToolCallDelta(index=self._calls, id=self._id_factory(), name=name, arguments=arguments)
        self._calls += 1
        return delta


def validate_tools(tools: object) -> list[dict[str, Any]]:
    """The request's ``tools`` (``None`` is no tools), or InvalidArgument naming the field."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidArgument("tools: must be an array")
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"tools: at most {MAX_TOOLS} tools are allowed, got {len(tools)}")
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        path = f"tools.{i}"
        if not isinstance(tool, dict):
            raise InvalidArgument(f"{path}: must be an object")
        # Bounds first: everything below may serialize or walk the tool.
        check_json_size(tool, path, max_bytes=MAX_TOOL_JSON_BYTES, max_depth=MAX_TOOL_DEPTH)
        if tool.get("type") != "function":
            raise InvalidArgument(f"{path}.type: must be 'function'")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidArgument(f"{path}.function: is required and must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InvalidArgument(f"{path}.function.name: is required and must match ^[a-zA-Z0-9_-]{{1,64}}$")
        if name in seen:
            raise InvalidArgument(f"{path}.function.name: duplicate tool name {name!r}")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidArgument(f"{path}.function.description: must be a string")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidArgument(f"{path}.function.strict: must be a boolean")
        if function.get("parameters") is not None:
            check_schema(
                function["parameters"],
                f"{path}.function.parameters",
                SchemaLimits(max_bytes=MAX_TOOL_JSON_BYTES, max_depth=MAX_SCHEMA_DEPTH),
            )
        out.append(tool)
    return out


def tool_names(tools: Collection[dict[str, Any]]) -> frozenset[str]:
    """Names declared by tools that passed :func:`validate_tools`."""
    return frozenset(t["function"]["name"] for t in tools)


def validate_tool_choice(choice: object, tools: Collection[dict[str, Any]]) -> ToolChoice:
    """The request's ``tool_choice`` against its validated ``tools``.

    Absent, it is ``auto`` with tools and ``none`` without, as in OpenAI. ``auto`` without
    tools means no tools; asking for a call without declaring tools is an error.
    """
    if choice is None or choice == "auto":
        return ToolChoice("auto" if tools else "none")
    if choice == "none":
        return ToolChoice("none")
    if choice == "required":
        if not tools:
            raise InvalidArgument("tool_choice: 'required' needs at least one tool in tools")
        return ToolChoice("required")
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise InvalidArgument("tool_choice.type: must be 'function'")
        function = choice.get("function")
        if not isinstance(function, dict):
            raise InvalidArgument("tool_choice.function: is required and must be an object")
        name = function.get("name")
        if not isinstance(name, str):
            raise InvalidArgument("tool_choice.function.name: is required and must be a string")
        if name not in tool_names(tools):
            raise InvalidArgument(f"tool_choice.function.name: {name!r:.80} is not a tool declared in tools")
        return ToolChoice("function", name)
    raise InvalidArgument(
        "tool_choice: must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def _parse_block(body: str, valid_names: Collection[str] | None) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` of a block's text, or None if it is not a call."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as err:
        logger.debug("tool call block of %d chars is not JSON (%s); kept as content", len(body), err)
        return None
    if not isinstance(obj, dict):
        logger.debug("tool call block holds a %s, not an object; kept as content", type(obj).__name__)
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        logger.debug("tool call block has no name; kept as content")
        return None
    if valid_names is not None and name not in valid_names:
        logger.debug("tool call names undeclared tool %r; kept as content", name[:80])
        return None
    # Some Hermes-style templates say "parameters".
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if args is None:
        return name, "{}"
    if isinstance(args, str):
        return name, args
    if not isinstance(args, dict):
        logger.debug("tool call arguments are a %s, not an object; kept as content", type(args).__name__)
        return None
    try:
        # allow_nan=False: a number too large for a float would otherwise come out as
        # "Infinity", which is not JSON.
        return name, json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError) as err:
        logger.debug("tool call arguments cannot be re-serialized (%s); kept as content", err)
        return None


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
