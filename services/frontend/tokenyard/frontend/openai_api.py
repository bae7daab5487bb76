"""The OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``) and their responses.

Bodies are validated with pydantic and turned into a :class:`GenerationRequest`. Unknown fields
are ignored: peer routers (sglang-router, vllm-router) and SDKs add their own. Extensions beyond
OpenAI follow vLLM's names: ``top_k``, ``min_p``, ``min_tokens``, ``repetition_penalty``,
``stop_token_ids``, ``ignore_eos``, ``chat_template_kwargs``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.chat_output import ChatDelta
from tokenyard.frontend.generation import (
    Delta,
    Endpoint,
    FinishReason,
    GenerationRequest,
    Sampling,
    StopConditions,
    Usage,
)
from tokenyard.frontend.response_format import parse_response_format
from tokenyard.frontend.tool_calls import ToolCall, validate_tool_choice, validate_tools

# OpenAI's default for /v1/completions; chat has no default (up to the context length).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_U32 = 2**32 - 1
_U64 = 2**64 - 1


class _Body(BaseModel):
    # JSON from Python clients may carry NaN and Infinity; no sampling option means either.
    # Strict: a value of the wrong JSON type is an error, not coerced ("stream": "yes" or 1 is
    # not a boolean, "max_tokens": true is not a count); integers still fill float fields.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False, strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingOptions(_Body):
    """The sampling fields every generation endpoint takes (the Responses API too)."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    # vLLM's convention: -1 (or 0) means no top-k limit.
    top_k: int | None = Field(default=None, ge=-1, le=_U32)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=_U64)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int = Field(default=0, ge=0, le=_U32)
    stop: str | list[str] | None = None
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)
    cache_salt: str | None = None

    def sampling(self) -> Sampling:
        seed = self.seed
        if seed is not None and seed < 0:
            # Clients send signed 64-bit seeds; the engine takes the same bits unsigned.
            seed &= _U64
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k and self.top_k > 0 else None,
            min_p=self.min_p,
            seed=seed,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
        )

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class NvExt(_Body):
    """Routing hints in the ``nvext`` extension object (the reference's name for it)."""

    session_id: str = Field(default="", max_length=256)
    expected_output_tokens: int | None = Field(default=None, ge=1, le=_U32)


class _SamplingBody(SamplingOptions):
    model: str = Field(min_length=1)
    nvext: NvExt | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=_U32)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    logprobs: Any = None


class CompletionBody(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ChatBody(_SamplingBody):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_U32)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    top_logprobs: int | None = None


_B = TypeVar("_B", bound=_Body)


def _validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


# A JSON escape of a UTF-16 surrogate; only bodies that have one need the walk below.
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def reject_lone_surrogates(raw: bytes, doc: object, what: str = "the request body") -> None:
    """JSON may escape a lone surrogate (``"\\ud800"``): a Python string then, but no text that
    encodes to UTF-8, which everything past the body (tokenizer, hashing, protobuf) needs."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    # Iterative: the document may be nested as deep as the JSON parser allowed.
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts: list[str] = [item]
        elif isinstance(item, dict):
            texts = [k for k in item if isinstance(k, str)]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"{what} is not valid Unicode: it contains a lone surrogate") from None


def _parse(cls: type[_B], body: object) -> _B:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise InvalidArgument(_validation_message(exc)) from None


def _common(body: _SamplingBody, max_tokens: int | None) -> dict[str, Any]:
    if body.n != 1:
        raise InvalidArgument("n: only one choice per request is supported")
    if body.logprobs not in (None, False):
        raise InvalidArgument("logprobs: log probabilities are not supported")
    if any(t < 0 or t > _U32 for t in body.stop_token_ids or ()):
        raise InvalidArgument("stop_token_ids: token ids must be in [0, 2**32)")
    return {
        "model": body.model,
        "stream": body.stream,
        "sampling": body.sampling(),
        "stop": StopConditions(
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            stop_strings=body.stop_strings(),
        ),
        "priority": body.priority,
        "cache_salt": body.cache_salt or "",
        "session_id": body.nvext.session_id if body.nvext else "",
        "expected_output_tokens": body.nvext.expected_output_tokens if body.nvext else None,
    }


def parse_completion(raw: object) -> tuple[GenerationRequest, bool]:
    """``(request, include_usage)`` of a ``/v1/completions`` body."""
    body = _parse(CompletionBody, raw)
    prompt = body.prompt
    text: str | None = None
    token_ids: list[int] | None = None
    if isinstance(prompt, str):
        text = prompt
    elif prompt and all(isinstance(p, int) for p in prompt):
        token_ids = prompt  # type: ignore[assignment]
    elif len(prompt) == 1:
        only = prompt[0]
        if isinstance(only, str):
            text = only
        else:
            token_ids = only  # type: ignore[assignment]
    elif not prompt:
        raise InvalidArgument("prompt: must not be empty")
    else:
        raise InvalidArgument("prompt: only one prompt per request is supported")
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    request = GenerationRequest(
        endpoint=Endpoint.COMPLETIONS,
        prompt=text,
        prompt_token_ids=token_ids,
        echo=body.echo,
        **_common(body, max_tokens),
    )
    return request, bool(body.stream_options and body.stream_options.include_usage)


class UnsupportedMediaType(InvalidArgument):
    """A body that is not labelled JSON: HTTP 415, INVALID_ARGUMENT elsewhere."""


# The chat roles OpenAI defines ("function" is its deprecated name for tool results).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")

# Media types of a JSON body. A request without one is taken as JSON (many clients send bytes
# unlabelled), and so is application/octet-stream, which HTTP libraries put on bytes whose
# caller named no type; anything else (a form, text, multipart) is not what these endpoints read.
_JSON_TYPES = ("application/json", "application/octet-stream")


def check_content_type(header: str | None) -> None:
    """Refuse (415) a body labelled as something other than JSON, or as JSON in another charset."""
    if not header:
        return
    mime, _, params = header.partition(";")
    mime = mime.strip().lower()
    if mime not in _JSON_TYPES and not (mime.startswith("application/") and mime.endswith("+json")):
        raise UnsupportedMediaType(f"Content-Type {mime!r} is not JSON: send the body as application/json")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"charset {value.strip()!r}: JSON bodies must be UTF-8")


def _message_text(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidArgument(f"messages.{index}.role: must be a non-empty string")
    if role not in CHAT_ROLES:
        raise InvalidArgument(
            f"messages.{index}.role: unknown role {role[:40]!r}; expected one of {', '.join(CHAT_ROLES)}"
        )
    content = message.get("content")
    if content is None and role != "assistant":
        # Only an assistant turn (one that made tool calls) may come without content.
        raise InvalidArgument(f"messages.{index}.content: is required for role {role!r}")
    if content is None or isinstance(content, str):
        return dict(message)
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidArgument(f"messages.{index}.content.{j}: only text parts are supported")
            parts.append(part["text"])
        return {**message, "content": "".join(parts)}
    raise InvalidArgument(f"messages.{index}.content: must be a string or a list of text parts")


def parse_chat(raw: object) -> tuple[GenerationRequest, bool]:
    """``(request, include_usage)`` of a ``/v1/chat/completions`` body."""
    body = _parse(ChatBody, raw)
    if body.top_logprobs:
        raise InvalidArgument("top_logprobs: log probabilities are not supported")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    tools = validate_tools(body.tools)
    choice = validate_tool_choice(body.tool_choice, tools)
    request = GenerationRequest(
        endpoint=Endpoint.CHAT_COMPLETIONS,
        messages=[_message_text(m, i) for i, m in enumerate(body.messages)],
        tools=tools or None,
        tool_choice=choice.mode,
        tool_choice_name=choice.name,
        guided=parse_response_format(body.response_format),
        template_kwargs=body.chat_template_kwargs,
        add_generation_prompt=body.add_generation_prompt,
        **_common(body, max_tokens),
    )
    return request, bool(body.stream_options and body.stream_options.include_usage)


# ---- responses ------------------------------------------------------------------------------


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _finish(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    # OpenAI clients know stop, length and content_filter; a worker-side abort is neither.
    return "stop" if reason is FinishReason.CANCELLED else reason.value


class ResponseWriter:
    """Renders the deltas of one request in the OpenAI shape of its endpoint."""

    def __init__(self, endpoint: Endpoint, request_id: str, model: str, include_usage: bool) -> None:
        self.chat = endpoint is Endpoint.CHAT_COMPLETIONS
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._object = "chat.completion.chunk" if self.chat else "text_completion"
        self._role_sent = False
        # Every middle chunk differs only in its text: render the rest once per request.
        head = json.dumps(
            {"id": self.id, "object": self._object, "created": self.created, "model": model},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        key = "delta" if self.chat else "text"
        inner = '{"content":' if self.chat else ""
        self._middle_head = (
            f'data: {head[:-1]},"choices":[{{"index":0,"finish_reason":null,"logprobs":null,"{key}":{inner}'
        )
        self._middle_tail = (
            ("}" if self.chat else "") + "}]" + (',"usage":null' if include_usage else "") + "}\n\n"
        )

    def full(self, text: str, last: Delta) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(last.finish_reason), "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_json(last.usage) if last.usage else None,
        }

    def full_parts(self, content: str, reasoning: str, calls: list[ToolCall], last: Delta) -> dict[str, Any]:
        """The whole chat completion of a parsed output (reasoning, tool calls)."""
        doc = self.full(content, last)
        message = doc["choices"][0]["message"]
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
            # OpenAI sends null content beside tool calls when the model said nothing else.
            message["content"] = content or None
            if last.finish_reason is FinishReason.STOP:
                doc["choices"][0]["finish_reason"] = "tool_calls"
        return doc

    def chunk_parts(self, delta: ChatDelta, finish: FinishReason | None, called: bool) -> bytes:
        """A chat chunk of a parsed output; ``called``: the output made tool calls (the finish
        reason is then ``tool_calls``)."""
        reason = _finish(finish)
        if called and finish is FinishReason.STOP:
            reason = "tool_calls"
        body: dict[str, Any] = {}
        if not self._role_sent:
            body["role"] = "assistant"
            self._role_sent = True
        if delta.content or not (delta.reasoning or delta.tool_calls):
            body["content"] = delta.content
        if delta.reasoning:
            body["reasoning_content"] = delta.reasoning
        if delta.tool_calls:
            body["tool_calls"] = [d.to_openai() for d in delta.tool_calls]
        doc: dict[str, Any] = {
            "id": self.id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "finish_reason": reason, "logprobs": None, "delta": body}],
        }
        if self.include_usage:
            doc["usage"] = None
        return sse(doc)

    def chunk(self, delta: Delta) -> bytes:
        if delta.finish_reason is None and (self._role_sent or not self.chat):
            return (self._middle_head + _json_string(delta.text) + self._middle_tail).encode()
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(delta.finish_reason), "logprobs": None}
        if self.chat:
            content: dict[str, Any] = {"content": delta.text}
            if not self._role_sent:
                content["role"] = "assistant"
                self._role_sent = True
            choice["delta"] = content
        else:
            choice["text"] = delta.text
        doc: dict[str, Any] = {
            "id": self.id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            # With include_usage, every chunk carries "usage": null except the extra last one.
            doc["usage"] = None
        return sse(doc)

    def usage_chunk(self, usage: Usage) -> bytes:
        return sse(
            {
                "id": self.id,
                "object": self._object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_json(usage),
            }
        )


_json_string = json.encoder.encode_basestring


def sse(doc: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}
