"""One streaming request to an OpenAI-compatible endpoint, timed as its chunks arrive.

Timing rules (also in bench/README.md):

* TTFT is the time from sending the request to the first chunk that carries content (completion
  ``text``, chat ``delta.content`` or ``delta.reasoning_content``); a chat stream's opening
  role-only chunk does not count.
* ITL samples are the gaps between consecutive content chunks, as the client sees them. A server
  that streams one token per chunk (Tokenyard, vLLM) makes these per-token gaps; one that packs
  several tokens into a chunk gives fewer, longer gaps, and chunks that arrive in the same network
  read give gaps of zero. TPOT, (last chunk - first chunk) / (output tokens - 1), spreads the
  decode time evenly over the tokens and is immune to packing.
* Output and prompt token counts come from the final usage chunk (``stream_options.include_usage``);
  without usage, output tokens fall back to the number of content chunks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from bench.loadgen.sse import SseEvent, SseParser
from bench.loadgen.workload import RequestSpec, as_text

Api = Literal["completions", "chat"]
PromptFormat = Literal["text", "tokens"]

_ROUTES: dict[Api, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _base(target: str) -> str:
    """The target without a trailing ``/v1...`` path, so users may paste either form."""
    parts = urlsplit(target)
    path = parts.path.rstrip("/")
    cut = path.find("/v1")
    if cut != -1:
        path = path[:cut]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def endpoint_url(target: str, api: Api) -> str:
    if urlsplit(target).path.rstrip("/").endswith("/completions"):
        return target
    return _base(target) + _ROUTES[api]


def models_url(target: str) -> str:
    return _base(target) + "/v1/models"


@dataclass(frozen=True)
class Endpoint:
    url: str
    api: Api
    model: str
    headers: Mapping[str, str] = field(default_factory=dict)
    extra_body: Mapping[str, object] = field(default_factory=dict)
    prompt_format: PromptFormat = "text"
    ignore_eos: bool = True


def build_body(endpoint: Endpoint, spec: RequestSpec) -> dict[str, object]:
    body: dict[str, object] = {
        "model": endpoint.model,
        "max_tokens": spec.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint.ignore_eos:
        # Fixed output lengths make runs comparable; both fields, since servers differ in which they honour.
        body["ignore_eos"] = True
        body["min_tokens"] = spec.output_len
    if endpoint.api == "chat":
        if endpoint.prompt_format == "tokens":
            raise ValueError("token-id prompts need the completions endpoint")
        body["messages"] = [{"role": "user", "content": as_text(spec.tokens)}]
    else:
        body["prompt"] = spec.tokens if endpoint.prompt_format == "tokens" else as_text(spec.tokens)
    if spec.session_id is not None:
        # A conversation's turns carry its id as a routing hint (session affinity).
        body["nvext"] = {"session_id": spec.session_id}
    body.update(endpoint.extra_body)
    return body


@dataclass
class RequestRecord:
    index: int
    start_s: float
    """time.perf_counter() when the request was sent."""
    end_s: float = 0.0
    error: str | None = None
    """Error class: ``http_<status>``, ``timeout``, ``stream_error``, ``incomplete_stream``,
    ``no_content``, ``bad_chunk`` or the aiohttp exception name; None when the request succeeded."""
    error_detail: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    content_chunks: int = 0
    last_chunk_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.content_chunks

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.last_chunk_s is None or self.output_tokens < 2:
            return None
        return (self.last_chunk_s - self.start_s - self.ttft_s) / (self.output_tokens - 1)

    def fail(self, error: str, detail: str | None = None) -> None:
        if self.error is None:
            self.error = error
            self.error_detail = detail

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "error": self.error,
            "error_detail": self.error_detail,
            "latency_s": self.latency_s,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "itl_s": self.itl_s,
            "content_chunks": self.content_chunks,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
        }


def _chunk_content(choice: Mapping[str, object]) -> str:
    text = choice.get("text")
    if isinstance(text, str) and text:
        return text
    delta = choice.get("delta")
    if isinstance(delta, dict):
        for key in ("content", "reasoning_content"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                return value
    return ""


def _usage(record: RequestRecord, usage: Mapping[str, object]) -> None:
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if isinstance(prompt, int):
        record.prompt_tokens = prompt
    if isinstance(completion, int):
        record.completion_tokens = completion
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        record.cached_tokens = details["cached_tokens"]


class StreamReader:
    """Turns the SSE events of one response into a RequestRecord; separate from I/O for tests."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.done = False
        self._parser = SseParser()

    def feed(self, data: bytes, now: float) -> None:
        for event in self._parser.feed(data):
            self._event(event, now)

    def close(self, now: float) -> None:
        for event in self._parser.close():
            self._event(event, now)
        rec = self.record
        if rec.ok and not self.done and rec.finish_reason is None:
            rec.fail("incomplete_stream", "the stream ended without [DONE] or a finish_reason")
        elif rec.ok and rec.content_chunks == 0:
            rec.fail("no_content", "the stream carried no content chunk")

    def _event(self, event: SseEvent, now: float) -> None:
        rec = self.record
        if event.data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(event.data)
        except ValueError:
            rec.fail("bad_chunk", event.data[:200])
            return
        if not isinstance(chunk, dict):
            rec.fail("bad_chunk", event.data[:200])
            return
        if chunk.get("error"):
            rec.fail("stream_error", json.dumps(chunk["error"])[:300])
            return
        choices = chunk.get("choices") or []
        if isinstance(choices, list):
            has_content = False
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                has_content = has_content or bool(_chunk_content(choice))
                if choice.get("finish_reason"):
                    rec.finish_reason = str(choice["finish_reason"])
            if has_content:
                if rec.last_chunk_s is None:
                    rec.ttft_s = now - rec.start_s
                else:
                    rec.itl_s.append(now - rec.last_chunk_s)
                rec.last_chunk_s = now
                rec.content_chunks += 1
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            _usage(rec, usage)


async def stream_request(
    session: aiohttp.ClientSession, endpoint: Endpoint, spec: RequestSpec
) -> RequestRecord:
    body = build_body(endpoint, spec)
    record = RequestRecord(index=spec.index, start_s=time.perf_counter())
    reader = StreamReader(record)
    try:
        async with session.post(endpoint.url, json=body, headers=dict(endpoint.headers)) as resp:
            if resp.status != 200:
                record.fail(f"http_{resp.status}", (await resp.text(errors="replace"))[:300])
            else:
                async for data in resp.content.iter_any():
                    reader.feed(data, time.perf_counter())
                reader.close(time.perf_counter())
    except TimeoutError:
        record.fail("timeout", "request timeout")
    except (aiohttp.ClientError, OSError) as exc:
        record.fail(type(exc).__name__, str(exc)[:300])
    record.end_s = time.perf_counter()
    return record


def open_session(pool_size: int, request_timeout_s: float) -> aiohttp.ClientSession:
    """One session per run; ``pool_size`` 0 means no connection limit (open-loop rate mode)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=pool_size, limit_per_host=pool_size),
        timeout=aiohttp.ClientTimeout(total=request_timeout_s),
    )


async def discover_model(session: aiohttp.ClientSession, target: str) -> str | None:
    """The first model the target lists at /v1/models, or None when it lists none or cannot say."""
    try:
        async with session.get(models_url(target)) as resp:
            if resp.status != 200:
                return None
            payload = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    data = payload.get("data") if isinstance(payload, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("id"), str):
        return str(data[0]["id"])
    return None
