"""The OpenAI Responses API (``POST /v1/responses``): request bodies and the response object,
whole or as its stream of typed events.

A response is stateless here: nothing is stored, so ``previous_response_id`` and
``background`` are refused with a clear message (send the conversation in ``input``), and the
object says ``"store": false``. The input items become chat messages and go through the model's
chat template, like ``/v1/chat/completions``.

The streaming sequence follows OpenAI's: ``response.created``, ``response.in_progress``, then per
output item ``response.output_item.added`` … ``response.output_item.done`` (a ``reasoning`` item
with ``response.reasoning_text.delta`` events, a ``message`` item with
``response.content_part.added``, ``response.output_text.delta`` …, ``response.output_text.done``,
``response.content_part.done``, and ``function_call`` items with
``response.function_call_arguments.delta``/``.done``), and last ``response.completed`` (or
``response.incomplete`` when the output hit max_output_tokens, ``response.failed`` on an error).
Every event carries ``type`` and a ``sequence_number``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError

from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.generation import (
    Endpoint,
    FinishReason,
    GenerationRequest,
    StopConditions,
    Usage,
)
from tokenyard.frontend.openai_api import SamplingOptions
from tokenyard.frontend.response_format import parse_text_format
from tokenyard.frontend.tool_calls import validate_tool_choice, validate_tools

_U32 = 2**32 - 1
_U64 = 2**64 - 1
# Items of one request's input; a conversation longer than this is not a chat.
MAX_INPUT_ITEMS = 4096


class ResponsesBody(SamplingOptions):
    # Unknown fields are ignored (SamplingOptions' config): SDKs add new ones faster than servers follow.
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=_U32)
    stream: bool = False
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning: dict[str, Any] | None = None
    previous_response_id: str | None = None
    background: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    truncation: str | None = None
    # Sampling (with the other endpoints' extensions: top_k, min_p, seed, penalties, stop, ...)
    # comes from SamplingOptions.


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A parsed body: the generation to run and what the response object echoes back."""

    generation: GenerationRequest
    body: ResponsesBody
    # The request's function tools in chat-completions form (what templates and parsers take).
    tools: list[dict[str, Any]]


def _where(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def _text_of(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument(f"{where}: must be a string or a list of content parts")
    parts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise InvalidArgument(f"{where}.{j}: must be an object")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
        else:
            raise InvalidArgument(f"{where}.{j}: only text parts are supported (got type {kind!r})")
    return "".join(parts)


_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def input_messages(body: ResponsesBody) -> list[dict[str, Any]]:
    """The chat messages of a body's ``instructions`` and ``input``."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        if not body.input:
            raise InvalidArgument("input: must not be empty")
        messages.append({"role": "user", "content": body.input})
        return messages
    if not body.input:
        raise InvalidArgument("input: must not be empty")
    if len(body.input) > MAX_INPUT_ITEMS:
        raise InvalidArgument(f"input: at most {MAX_INPUT_ITEMS} items")
    for i, item in enumerate(body.input):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            given = item.get("role")
            # Not a dict lookup of any JSON value: a list or an object there is unhashable.
            role = _ROLES.get(given) if isinstance(given, str) else None
            if role is None:
                raise InvalidArgument(f"{where}.role: must be one of user, assistant, system, developer")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(args, str) or not isinstance(call_id, str):
                raise InvalidArgument(f"{where}: a function_call needs string name, arguments and call_id")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            # Consecutive calls belong to one assistant turn.
            last = messages[-1] if messages else None
            if (
                last is not None
                and last["role"] == "assistant"
                and last.get("tool_calls")
                and not last["content"]
            ):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise InvalidArgument(f"{where}.call_id: must be a string")
            messages.append(
                {"role": "tool", "tool_call_id": call_id, "content": _text_of(output, f"{where}.output")}
            )
        elif kind == "reasoning":
            # Earlier reasoning is not fed back to the model (as chat templates do).
            continue
        else:
            raise InvalidArgument(f"{where}.type: {kind!r} items are not supported")
    if not any(m["role"] != "system" for m in messages):
        raise InvalidArgument("input: has no user or assistant message")
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Responses-API function tools (flat) in chat-completions form (nested ``function``)."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools or ()):
        if tool.get("type") != "function":
            raise InvalidArgument(
                f"tools.{i}.type: only function tools are supported (got {tool.get('type')!r})"
            )
        if "function" in tool:  # already in chat form
            out.append(tool)
            continue
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": function})
    return out


# OpenAI's limits on metadata: it is echoed in every response object (three times a stream).
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidArgument(f"metadata: at most {MAX_METADATA_PAIRS} key-value pairs")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidArgument(f"metadata: keys are at most {MAX_METADATA_KEY} characters")
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidArgument(f"metadata.{key}: values are at most {MAX_METADATA_VALUE} characters")


def parse_responses(raw: object) -> ResponsesRequest:
    if not isinstance(raw, dict):
        raise InvalidArgument("the request body must be a JSON object")
    try:
        body = ResponsesBody.model_validate(raw)
    except ValidationError as exc:
        raise InvalidArgument(_where(exc)) from None
    if body.previous_response_id:
        raise InvalidArgument(
            "previous_response_id: this server does not store responses; send the whole conversation in input"
        )
    _check_metadata(body.metadata)
    if body.background:
        raise InvalidArgument("background: background responses are not supported")
    if body.top_logprobs:
        raise InvalidArgument("top_logprobs: log probabilities are not supported")
    tools = validate_tools(chat_tools(body.tools)) if body.tools else []
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        # The Responses API names the function flat: {"type": "function", "name": ...}.
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    tool_choice = validate_tool_choice(choice, tools)
    text_format = (body.text or {}).get("format")
    generation = GenerationRequest(
        model=body.model,
        endpoint=Endpoint.RESPONSES,
        stream=body.stream,
        messages=input_messages(body),
        tools=tools or None,
        tool_choice=tool_choice.mode,
        tool_choice_name=tool_choice.name,
        guided=parse_text_format(text_format),
        sampling=body.sampling(),
        stop=StopConditions(
            max_tokens=body.max_output_tokens, min_tokens=body.min_tokens, stop_strings=body.stop_strings()
        ),
        priority=body.priority,
        cache_salt=body.cache_salt or "",
    )
    return ResponsesRequest(generation, body, tools)


# ---- the response object and its events -----------------------------------------------------


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_json(usage: Usage | None, reasoning_tokens: int = 0) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        # Nothing is written to a cache on request: prefix caching is the engine's own.
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class FunctionCall:
    call_id: str
    name: str
    arguments: str


class ResponsesWriter:
    """Builds one response: the whole object (:meth:`full`) or its events, fed with output as it
    comes (reasoning text, answer text, whole function calls) and closed with :meth:`finish`."""

    def __init__(self, request: ResponsesRequest, request_id: str) -> None:
        self._req = request
        self.id = f"resp_{request_id}"
        self.created = int(time.time())
        self._seq = 0
        # Output items so far, in order; the open one (if any) is the last.
        self._items: list[dict[str, Any]] = []
        self._open: str | None = None  # "reasoning" | "message"
        self._text_parts: list[str] = []

    # ---- the response object ---------------------------------------------------------------

    def response(
        self, status: str, usage: Usage | None = None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = self._req.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        text_format = (body.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": list(self._items),
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": body.reasoning or {"effort": None, "summary": None},
            "store": False,
            "temperature": body.temperature,
            "text": {"format": text_format},
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [],
            "top_p": body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": usage_json(usage),
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def full(
        self,
        content: str,
        reasoning: str,
        calls: list[FunctionCall],
        finish: FinishReason | None,
        usage: Usage | None,
    ) -> dict[str, Any]:
        if reasoning:
            self._items.append(self._reasoning_item(_item_id("rs"), reasoning, "completed"))
        if content or not calls:
            self._items.append(self._message_item(_item_id("msg"), content, "completed"))
        for call in calls:
            self._items.append(self._call_item(call, "completed"))
        return self.response(_status(finish), usage)

    # ---- events ------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        doc = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def start(self) -> bytes:
        shell = self.response("in_progress")
        return self._event("response.created", response=shell) + self._event(
            "response.in_progress", response=shell
        )

    def reasoning(self, text: str) -> bytes:
        if not text:
            return b""
        out = self._switch("reasoning")
        item = self._items[-1]
        self._text_parts.append(text)
        return out + self._event(
            "response.reasoning_text.delta",
            item_id=item["id"],
            output_index=len(self._items) - 1,
            content_index=0,
            delta=text,
        )

    def text(self, text: str) -> bytes:
        if not text:
            return b""
        out = self._switch("message")
        item = self._items[-1]
        self._text_parts.append(text)
        return out + self._event(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=len(self._items) - 1,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def function_call(self, call: FunctionCall) -> bytes:
        out = self._close()
        item = self._call_item(call, "in_progress")
        self._items.append(item)
        index = len(self._items) - 1
        done = {**item, "status": "completed"}
        self._items[-1] = done
        return (
            out
            + self._event("response.output_item.added", output_index=index, item=item)
            + self._event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=call.arguments,
            )
            + self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=call.arguments,
            )
            + self._event("response.output_item.done", output_index=index, item=done)
        )

    def finish(self, finish: FinishReason | None, usage: Usage | None) -> bytes:
        out = self._close()
        if not self._items:
            # Nothing was generated: the response still has its (empty) message.
            out += self._switch("message") + self._close()
        status = _status(finish)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._event(kind, response=self.response(status, usage))

    def fail(self, kind: str, message: str) -> bytes:
        """``kind``: the error's OpenAI type (``overloaded_error``, ``timeout_error``, ...)."""
        out = self._close()
        # Clients know a fixed set of codes; the specific kind goes in "type".
        code = "rate_limit_exceeded" if kind == "overloaded_error" else "server_error"
        error = {"code": code, "message": message, "type": kind}
        return out + self._event("response.failed", response=self.response("failed", error=error))

    def _switch(self, kind: str) -> bytes:
        if self._open == kind:
            return b""
        out = self._close()
        self._open = kind
        self._text_parts = []
        if kind == "reasoning":
            item = self._reasoning_item(_item_id("rs"), "", "in_progress")
            item["content"] = []
        else:
            item = self._message_item(_item_id("msg"), "", "in_progress")
            item["content"] = []
        self._items.append(item)
        index = len(self._items) - 1
        out += self._event("response.output_item.added", output_index=index, item=item)
        if kind == "message":
            out += self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            )
        return out

    def _close(self) -> bytes:
        kind = self._open
        if kind is None:
            return b""
        self._open = None
        index = len(self._items) - 1
        item_id = self._items[index]["id"]
        text = "".join(self._text_parts)
        if kind == "reasoning":
            done = self._reasoning_item(item_id, text, "completed")
            self._items[index] = done
            return self._event(
                "response.reasoning_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=text,
            ) + self._event("response.output_item.done", output_index=index, item=done)
        done = self._message_item(item_id, text, "completed")
        self._items[index] = done
        part = done["content"][0]
        return (
            self._event(
                "response.output_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            + self._event(
                "response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part
            )
            + self._event("response.output_item.done", output_index=index, item=done)
        )

    @staticmethod
    def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
        return {
            "type": "message",
            "id": item_id,
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }

    @staticmethod
    def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
        return {
            "type": "reasoning",
            "id": item_id,
            "status": status,
            "summary": [],
            "content": [{"type": "reasoning_text", "text": text}],
        }

    @staticmethod
    def _call_item(call: FunctionCall, status: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": _item_id("fc"),
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
            "status": status,
        }


def _status(finish: FinishReason | None) -> str:
    return "incomplete" if finish is FinishReason.LENGTH else "completed"
