"""Malformed requests against both public surfaces of a real deployment.

A router, two mocker workers that never sleep and the frontend run as processes. Seeded
generators send broken OpenAI bodies (``/v1/completions``, ``/v1/chat/completions``) and broken
KServe requests (ModelInfer, ModelStreamInfer) while a loop of well-formed requests runs beside
them. Every answer must be a client error or a success, never a server error; the well-formed
requests must keep succeeding; and afterwards nothing may be left in flight.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import random
import struct
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest

from tests.fixtures.processes import ServiceProcess, wait_for_instance
from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Instance, open_discovery

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
SEED = 20261125
# Fuzz requests in flight at once.
PARALLEL = 8
# gRPC codes a malformed request may get: the client's fault, or a size limit of gRPC itself.
_GRPC_ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
}
_STREAM_ERROR_ALLOWED = ("INVALID_ARGUMENT:", "NOT_FOUND:", "OUT_OF_RANGE:")


@dataclass
class Deployment:
    router: Instance
    workers: list[Instance]
    frontend: Instance
    procs: list[ServiceProcess]

    @property
    def http(self) -> str:
        return f"http://{self.frontend.metrics_address}"


def _worker_argv(discovery: str) -> list[str]:
    return [
        "worker",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--discovery",
        discovery,
        "--mocker-speedup-ratio",
        "0",
        # A short context keeps the longest valid request (one without max_tokens) short.
        "--mocker-max-model-len",
        "2048",
    ]


async def _workers(discovery: str, procs: list[ServiceProcess]) -> list[Instance]:
    client = open_discovery(discovery)
    try:
        deadline = time.monotonic() + 60
        while True:
            found = await client.instances("worker")
            if len(found) >= 2:
                return found
            for proc in procs:
                if proc.proc.poll() is not None:
                    raise AssertionError(f"{proc.argv} exited:\n{proc.output()}")
            if time.monotonic() > deadline:
                raise AssertionError("the workers never registered")
            await asyncio.sleep(0.1)
    finally:
        await client.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("fuzz")
    discovery = f"dir://{root / 'discovery'}"

    def start(name: str, argv: list[str]) -> ServiceProcess:
        return ServiceProcess(argv, root / f"{name}.log")

    procs = [
        start("router", ["router", "--port", "0", "--metrics-port", "0", "--discovery", discovery]),
        start("worker-a", _worker_argv(discovery)),
        start("worker-b", _worker_argv(discovery)),
        start("frontend", ["frontend", "--port", "0", "--http-port", "0", "--discovery", discovery]),
    ]
    try:
        workers = asyncio.run(_workers(discovery, procs))
        router = asyncio.run(wait_for_instance(discovery, "router", proc=procs[0]))
        frontend = asyncio.run(wait_for_instance(discovery, "frontend", proc=procs[-1]))
        d = Deployment(router, workers, frontend, procs)
        _wait_ready(d)
        yield d
        assert procs[-1].terminate() == 0
    finally:
        for proc in procs:
            proc.close()


def _wait_ready(d: Deployment) -> None:
    """Both workers have served a request: the router knows them and tokenizers are loaded."""
    body = json.dumps({"model": MODEL, "prompt": "ready?", "max_tokens": 1}).encode()
    deadline = time.monotonic() + 60
    served = 0
    while served < 2 * len(d.workers):
        request = urllib.request.Request(
            d.http + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                served += r.status == 200
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"the frontend never served:\n{d.procs[-1].output()}") from None
            time.sleep(0.1)


# ---- generators -------------------------------------------------------------------------------

_STRINGS = [
    "",
    "x",
    "hello world",
    "\ud800",
    "a\udfffb",
    "\x00",
    "\u202e\u200b\ufeff",
    "😀" * 50,
    "\U0010ffff",
    "<|im_start|>system\n",
    "{{ raise_exception('boom') }}",
    "{% for x in range(10**9) %}{% endfor %}",
    MODEL,
]
_NUMBERS: list[Any] = [
    0,
    1,
    -1,
    2,
    3,
    -(2**31),
    2**31,
    2**32,
    2**32 - 1,
    2**53 + 1,
    2**63,
    -(2**63) - 1,
    2**64,
    2**100,
    10**400,
    -(10**30),
    0.5,
    -0.0,
    1e-320,
    1e308,
    -1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    3.7,
]


def _value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value (NaN and Infinity included, as Python's json writes them)."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind in (2, 3):
        return rng.choice(_NUMBERS)
    if kind == 4:
        return rng.choice(_STRINGS)
    if kind == 5:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 40)))
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {
        rng.choice([*_STRINGS, "role", "content", "type", "text"]): _value(rng, depth + 1) for _ in range(3)
    }


_SAMPLING_FIELDS = [
    "model",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "priority",
    "cache_salt",
    "logit_bias",
    "user",
    "response_format",
]
_COMPLETION_FIELDS = [*_SAMPLING_FIELDS, "prompt", "echo", "suffix", "best_of"]
_CHAT_FIELDS = [
    *_SAMPLING_FIELDS,
    "messages",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "chat_template_kwargs",
    "add_generation_prompt",
    "top_logprobs",
    "response_format",
    "parallel_tool_calls",
]
_RESPONSES_FIELDS = [
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "text",
    "tools",
    "tool_choice",
    "reasoning",
    "previous_response_id",
    "background",
    "metadata",
    "store",
    "top_logprobs",
    "truncation",
]


def _token_ids(rng: random.Random) -> list[Any]:
    size = rng.choice([0, 1, 3, 50, 5000, 100_000])
    pool: list[Any] = [
        0,
        1,
        5,
        100,
        49151,
        49152,
        10**6,
        -1,
        2**31,
        2**32,
        2**40,
        2**64,
        1.5,
        True,
        "7",
        None,
    ]
    ids: list[Any] = [rng.randrange(0, 49152) for _ in range(size)]
    if ids and rng.random() < 0.8:
        ids[rng.randrange(len(ids))] = rng.choice(pool)
    return ids


def _prompt(rng: random.Random) -> Any:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.choice(_STRINGS)
    if kind == 1:
        return _token_ids(rng)
    if kind == 2:
        return [_token_ids(rng) for _ in range(rng.randrange(0, 3))]
    if kind == 3:
        return [rng.choice(_STRINGS) for _ in range(rng.randrange(0, 3))]
    if kind == 4:
        # Long, but below the body limit; mostly over the context length.
        return "word " * rng.choice([2000, 20_000, 200_000])
    if kind == 5:
        return [["a"], [1, "b"]]
    return _value(rng)


def _messages(rng: random.Random) -> Any:
    if rng.random() < 0.15:
        return _value(rng)
    out: list[Any] = []
    for _ in range(rng.randrange(0, 4)):
        kind = rng.randrange(6)
        role = rng.choice(
            ["user", "assistant", "system", "tool", "developer", "", "nobody", None, 7, ["user"]]
        )
        if kind == 0:
            out.append({"role": role, "content": rng.choice(_STRINGS)})
        elif kind == 1:
            parts = [
                rng.choice(
                    [
                        {"type": "text", "text": rng.choice(_STRINGS)},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                        {"type": "text"},
                        {"type": "text", "text": 5},
                        "text",
                        None,
                        _value(rng),
                    ]
                )
                for _ in range(rng.randrange(0, 4))
            ]
            out.append({"role": role, "content": parts})
        elif kind == 2:
            out.append({"role": "assistant", "content": None, "tool_calls": _value(rng)})
        elif kind == 3:
            out.append({"content": "no role"})
        elif kind == 4:
            out.append({"role": "user", "content": _value(rng), "name": _value(rng)})
        else:
            out.append(_value(rng))
    return out


def _tools(rng: random.Random) -> Any:
    return rng.choice(
        [
            _value(rng),
            [_value(rng)],
            [{"type": "function"}],
            [{"type": "function", "function": _value(rng)}],
            [{"type": "function", "function": {"name": _value(rng), "parameters": _value(rng)}}],
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        ]
    )


def _format(rng: random.Random) -> Any:
    deep: Any = {"type": "object"}
    # Deeper than the schema limit (32), within what the JSON encoder here can write.
    for _ in range(rng.choice([1, 40, 300])):
        deep = {"type": "object", "properties": {"x": deep}}
    return rng.choice(
        [
            {"type": "json_object"},
            {"type": "text"},
            {"type": rng.choice(_STRINGS)},
            {"type": "json_schema", "json_schema": _value(rng)},
            {"type": "json_schema", "json_schema": {"name": "n", "schema": deep}},
            {"type": "json_schema", "json_schema": {"name": "n", "schema": {"$ref": "http://x/y"}}},
            {"type": "json_schema", "name": "n", "schema": {"type": "object"}},
            _value(rng),
        ]
    )


def _input(rng: random.Random) -> Any:
    item = rng.choice(
        [
            {"role": "user", "content": "hi"},
            {"role": _value(rng), "content": "hi"},
            {"role": "user", "content": [{"type": "input_text", "text": _value(rng)}]},
            {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]},
            {"type": "function_call", "call_id": _value(rng), "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": _value(rng)},
            {"type": "reasoning", "summary": []},
            {"type": rng.choice(_STRINGS)},
            _value(rng),
        ]
    )
    return rng.choice(["", "hi", [], [item], [item] * rng.randrange(1, 50), _value(rng)])


def _field_value(rng: random.Random, name: str) -> Any:
    if rng.random() < 0.4:
        return _value(rng)
    if name == "input":
        return _input(rng)
    if name == "response_format":
        return _format(rng)
    if name == "text":
        return rng.choice([{"format": _format(rng)}, _value(rng)])
    if name == "tool_choice":
        return rng.choice(
            [
                "none",
                "auto",
                "required",
                {"type": "function", "function": {"name": "f"}},
                {"type": "function", "name": "g"},
            ]
        )
    if name == "prompt":
        return _prompt(rng)
    if name == "messages":
        return _messages(rng)
    if name == "tools":
        return _tools(rng)
    if name == "stream_options":
        return rng.choice([{"include_usage": _value(rng)}, _value(rng), {"continuous_usage_stats": True}])
    if name in ("stop", "stop_token_ids"):
        return rng.choice([[_value(rng) for _ in range(rng.randrange(6))], ["\ud800"], [""], ["x"] * 1000])
    if name == "logit_bias":
        return rng.choice([{"50256": -100}, {"-1": 1e308}, {"x": "y"}, {str(2**64): float("nan")}])
    if name in ("n", "best_of"):
        return rng.choice([0, 1, 2, 128, -1, 2**40])
    if name in ("max_tokens", "max_completion_tokens", "min_tokens"):
        return rng.choice([-1, 0, 1, 8, 2**31, 2**32, 2**64, 1.0, 1.5, "4", 10**6])
    if name == "model":
        return rng.choice([MODEL, MODEL.upper(), "", "nope", MODEL + "\x00", "\ud800"])
    if name in ("cache_salt", "user", "stop"):
        return rng.choice(_STRINGS)
    if name == "chat_template_kwargs":
        return rng.choice([{"enable_thinking": True}, {"messages": "x"}, {"tools": 5}, _value(rng)])
    return _value(rng)


def _base_completion() -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 4}


def _base_chat() -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class HttpCase:
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


def _encode_body(rng: random.Random, doc: Any) -> bytes:
    text = json.dumps(doc, allow_nan=True, ensure_ascii=rng.random() < 0.7)
    # ensure_ascii=False keeps lone surrogates as text: send them as replacement-free bytes.
    return text.encode("utf-8", errors="surrogatepass")


def http_case(rng: random.Random) -> HttpCase:
    if rng.random() < 0.25:
        return _responses_case(rng)
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    fields = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    kind = rng.randrange(20)
    if kind == 0:
        return HttpCase(path, b"")
    if kind == 1:
        return HttpCase(path, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    if kind == 2:
        good = _encode_body(rng, _base_chat() if chat else _base_completion())
        return HttpCase(path, good[: rng.randrange(len(good))])
    if kind == 3:
        depth = rng.choice([100, 1000, 100_000])
        key = '{"model":"' + MODEL + '","prompt":' if not chat else '{"model":"' + MODEL + '","messages":'
        return HttpCase(path, (key + "[" * depth + "]" * depth + "}").encode())
    if kind == 4:
        raw = rng.choice(
            [
                b'{"model":"%s","prompt":"\xff\xfe","max_tokens":2}' % MODEL.encode(),
                b'{"model":"%s","prompt":"x","max_tokens":NaN}' % MODEL.encode(),
                b'{"model":"%s","prompt":"x","temperature":Infinity}' % MODEL.encode(),
                b'{"model":"%s","prompt":"x","max_tokens":%s}' % (MODEL.encode(), b"9" * 5000),
                b'{"model":"%s","prompt":"\\ud800\\udbff","max_tokens":2}' % MODEL.encode(),
                b'{"model":"%s","prompt":"x"' % MODEL.encode(),
                b"null",
                b"[]",
                b"42",
                b'"a string"',
                b"\xef\xbb\xbf{}",
                b'{"model":"%s","prompt":"x","prompt":[1,2]}' % MODEL.encode(),
            ]
        )
        return HttpCase(path, raw)
    if kind == 5:
        good = _encode_body(rng, _base_chat() if chat else _base_completion())
        content_type = rng.choice(
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "",
                "application/json; charset=latin-1",
            ]
        )
        return HttpCase(path, good, {"Content-Type": content_type} if content_type else {})
    doc: dict[str, Any] = _base_chat() if chat else _base_completion()
    for _ in range(rng.randrange(1, 4)):
        action = rng.randrange(6)
        name = rng.choice(fields)
        if action == 0:
            doc.pop(name, None)
        elif action == 1:
            doc[rng.choice(_STRINGS) or "extra"] = _value(rng)
        else:
            doc[name] = _field_value(rng, name)
    if chat and doc.get("max_tokens") is None and doc.get("max_completion_tokens") is None:
        # Chat has no default limit: without one a valid request runs to the context length.
        doc["max_completion_tokens"] = 8
    if rng.random() < 0.05:
        doc = {"wrapper": doc}
    return HttpCase(path, _encode_body(rng, doc))


def _responses_case(rng: random.Random) -> HttpCase:
    path = "/v1/responses"
    doc: Any = {"model": MODEL, "input": "hi", "max_output_tokens": 4}
    if rng.random() < 0.1:
        good = _encode_body(rng, doc)
        return HttpCase(path, good[: rng.randrange(len(good))])
    for _ in range(rng.randrange(1, 4)):
        name = rng.choice(_RESPONSES_FIELDS)
        if rng.randrange(6) == 0:
            doc.pop(name, None)
        else:
            doc[name] = _field_value(rng, name)
    if doc.get("max_output_tokens") is None:
        doc["max_output_tokens"] = 8
    return HttpCase(path, _encode_body(rng, doc))


def _huge_cases(full: bool) -> list[Any]:
    """Large bodies: one string, one token id array, many messages; in the full run they come
    near the 32 MiB limit (tokenizing 30 MB takes a while), and one goes over it."""
    mib = 1024 * 1024 if full else 32 * 1024
    word = b"word "
    prompt = b'{"model":"%s","max_tokens":4,"prompt":"' % MODEL.encode() + word * (6 * mib) + b'"}'
    over = b'{"model":"%s","max_tokens":4,"prompt":"' % MODEL.encode() + b"x" * (33 * 1024 * 1024) + b'"}'
    ids = b'{"model":"%s","max_tokens":4,"prompt":[' % MODEL.encode() + b"17," * (4 * mib) + b"4294967296]}"
    messages = json.dumps(
        {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}] * (mib // 5)}
    ).encode()
    big_text = pb.ModelInferRequest(model_name=MODEL)
    tensor = big_text.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"word " * (3 * mib))
    return [
        HttpCase("/v1/completions", prompt),
        HttpCase("/v1/completions", over),
        HttpCase("/v1/completions", ids),
        HttpCase("/v1/chat/completions", messages),
        big_text,
    ]


# ---- KServe -----------------------------------------------------------------------------------

_DATATYPES = [
    "BYTES",
    "BOOL",
    "INT32",
    "INT64",
    "UINT64",
    "INT8",
    "FP32",
    "FP16",
    "BF16",
    "",
    "STRING",
    "bytes",
]
_INPUT_NAMES = [
    "text_input",
    "streaming",
    "stream",
    "max_tokens",
    "exclude_input_in_output",
    "sampling_parameters",
    "text_output",
    "",
    "bogus",
]


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


_SAMPLING_KEYS = [
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "ignore_eos",
    "stop",
    "stop_token_ids",
]
# Integers with no float (and so no float comparison or conversion that works).
_HUGE = [10**400, -(10**400), 2**1024]


def _sampling_json(rng: random.Random) -> bytes:
    doc = rng.choice(
        [
            {"temperature": _value(rng), "top_p": _value(rng)},
            {"max_tokens": _value(rng)},
            {"stop": _value(rng), "stop_token_ids": _value(rng)},
            {"seed": _value(rng), "top_k": _value(rng), "ignore_eos": _value(rng)},
            {"min_tokens": _value(rng), "repetition_penalty": _value(rng)},
            {rng.choice(_SAMPLING_KEYS): rng.choice(_NUMBERS + _HUGE) for _ in range(3)},
            {
                rng.choice(["max_tokens", "min_tokens", "seed", "top_k"]): rng.choice(
                    [*_HUGE, 2**64 - 1, 2**64, 1.5, "7", "1e3", True, "nan", 4]
                )
            },
            _value(rng),
        ]
    )
    raw = json.dumps(doc, allow_nan=True).encode()
    return rng.choice([raw, raw, raw, raw, b"{not json", b"\xff", b"[1,2]", b"[" * 100_000])


def _parameter(rng: random.Random) -> pb.InferParameter:
    param = pb.InferParameter()
    kind = rng.randrange(7)
    if kind == 1:
        param.bool_param = rng.random() < 0.5
    elif kind == 2:
        param.int64_param = rng.choice([-(2**63), -1, 0, 4, 2**63 - 1])
    elif kind == 3:
        param.string_param = rng.choice(["4", "nan", "inf", "x", "", "1e400", "-5"])
    elif kind == 4:
        param.double_param = rng.choice([*_NUMBERS[-10:], 0.5])
    elif kind == 5:
        param.uint64_param = rng.choice([0, 1, 2**32 - 1])
    elif kind == 6:
        param.uint64_param = rng.choice([0, 1, 2**64 - 1])
    return param  # kind 0: no oneof member set


def _good_input(
    rng: random.Random, name: str, raw: bool
) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    """A well-formed input and its raw form (used only when the request goes raw)."""
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, shape=[1])
    c = tensor.contents
    if name == "text_input":
        tensor.datatype = "BYTES"
        text = rng.choice(
            [b"hello there", b"\xff\xfe broken utf-8", "\ud800".encode("utf-8", "surrogatepass")]
        )
        data = _bytes_element(text)
        c.bytes_contents.append(text)
    elif name == "sampling_parameters":
        tensor.datatype = "BYTES"
        doc = _sampling_json(rng)
        data = _bytes_element(doc)
        c.bytes_contents.append(doc)
    elif name == "max_tokens":
        tensor.datatype = rng.choice(["INT32", "INT32", "INT64", "UINT64", "INT8"])
        value = rng.choice([1, 4, 8, 0, -1, 2**31 - 1])
        fmt = {"INT32": "<i", "INT64": "<q", "UINT64": "<Q", "INT8": "<b"}[tensor.datatype]
        value = max(value, 0) if tensor.datatype == "UINT64" else value
        value = max(min(value, 127), -128) if tensor.datatype == "INT8" else value
        data = struct.pack(fmt, value)
        if tensor.datatype == "UINT64":
            c.uint64_contents.append(value)
        elif tensor.datatype == "INT64":
            c.int64_contents.append(value)
        else:
            c.int_contents.append(value)
    else:
        tensor.datatype = "BOOL"
        flag = rng.random() < 0.3
        data = bytes([flag])
        c.bool_contents.append(flag)
    if raw:
        tensor.ClearField("contents")
    return tensor, data


def _mutate(rng: random.Random, request: pb.ModelInferRequest) -> None:
    """One way to break a well-formed request."""
    inputs = request.inputs
    raw = request.raw_input_contents
    kind = rng.randrange(13)
    if kind == 0 and inputs:
        rng.choice(inputs).datatype = rng.choice(_DATATYPES)
    elif kind == 1 and inputs:
        rng.choice(inputs).shape[:] = rng.choice(
            [[], [0], [-1], [1, 0], [2**62, 2**62], [-1, -1], [3], [1, 1, 1, 1]]
        )
    elif kind == 2:
        tensor, data = _good_input(rng, rng.choice(_INPUT_NAMES), bool(raw))
        tensor.name = rng.choice(_INPUT_NAMES)
        inputs.append(tensor)
        if raw:
            raw.append(data)
    elif kind == 3:
        for i, tensor in enumerate(inputs):
            if tensor.name == "text_input":
                del inputs[i]
                if i < len(raw):
                    del raw[i]
                break
    elif kind == 4 and raw:
        if rng.random() < 0.5:
            raw.pop()
        else:
            raw.append(b"\x01\x00\x00\x00x")
    elif kind == 5 and raw:
        i = rng.randrange(len(raw))
        raw[i] = rng.choice(
            [b"", b"\x05\x00", struct.pack("<I", rng.choice([10, 2**31, 2**32 - 1])) + b"abc"]
        )
    elif kind == 6 and inputs:
        # Both raw and typed contents, or typed contents of another kind.
        contents = rng.choice(inputs).contents
        which = rng.randrange(4)
        if which == 0:
            contents.bytes_contents.append(b"typed")
        elif which == 1:
            contents.int_contents.append(7)
        elif which == 2:
            contents.fp32_contents.append(float("nan"))
        else:
            contents.bool_contents.append(True)
    elif kind == 7 and inputs and not raw:
        tensor = rng.choice(inputs)
        tensor.ClearField("contents")
    elif kind == 8:
        request.model_name = rng.choice(["", "nope", MODEL + "\x00", MODEL.lower(), "\ufffd"])
    elif kind == 9:
        request.model_version = rng.choice(["2", "-1", "latest", "\x00", "9" * 100])
    elif kind == 10:
        request.id = rng.choice(["", "x" * 10_000, "\u202e"])
    else:
        for _ in range(rng.randrange(1, 4)):
            key = rng.choice([*_SAMPLING_KEYS, "priority", "sequence_id", "bogus", ""])
            request.parameters[key].CopyFrom(_parameter(rng))


def kserve_case(rng: random.Random) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    raw = rng.random() < 0.5
    names = ["text_input"]
    for name in ("max_tokens", "sampling_parameters", "streaming", "stream", "exclude_input_in_output"):
        if rng.random() < 0.3:
            names.append(name)
    rng.shuffle(names)
    for name in names:
        tensor, data = _good_input(rng, name, raw)
        request.inputs.append(tensor)
        if raw:
            request.raw_input_contents.append(data)
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        _mutate(rng, request)
    if rng.random() < 0.05:
        request.outputs.add(name=rng.choice(["text_output", "nope"]))
    return request


# ---- the run ----------------------------------------------------------------------------------


@dataclass
class Tally:
    http: dict[int, int] = field(default_factory=dict)
    grpc: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    good: int = 0

    def fail(self, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(what)


async def _send_http(session: aiohttp.ClientSession, base: str, case: HttpCase, tally: Tally) -> None:
    # aiohttp warns of large bytes bodies (they are sent in one go); a stream of them is fine.
    data = case.body if len(case.body) < 1 << 20 else io.BytesIO(case.body)
    async with session.post(base + case.path, data=data, headers=case.headers) as r:
        body = await r.read()
        tally.http[r.status] = tally.http.get(r.status, 0) + 1
        if r.status >= 500:
            tally.fail(f"HTTP {r.status} for {case.path} {case.body[:300]!r}: {body[:300]!r}")
        elif r.status >= 400:
            doc = json.loads(body)
            if not doc["error"]["message"]:
                tally.fail(f"HTTP {r.status} without a message for {case.body[:300]!r}")
        elif r.headers.get("Content-Type", "").startswith("text/event-stream"):
            # An error after the first event arrives as an event: it must not be a server error.
            for line in body.split(b"\n"):
                if line.startswith(b'data: {"error"') and b'"code":5' in line:
                    tally.fail(f"stream error event for {case.body[:300]!r}: {line[:300]!r}")


async def _send_infer(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub, request: pb.ModelInferRequest, tally: Tally
) -> None:
    try:
        await stub.ModelInfer(request, timeout=60)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code not in _GRPC_ALLOWED or not exc.details():
            tally.fail(f"ModelInfer {code.name} {exc.details()!r} for {str(request)[:400]!r}")
    tally.grpc[code.name] = tally.grpc.get(code.name, 0) + 1


async def _send_stream(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub, requests: list[pb.ModelInferRequest], tally: Tally
) -> None:
    async def gen() -> AsyncIterator[pb.ModelInferRequest]:
        for r in requests:
            yield r

    finals = 0
    try:
        async for response in stub.ModelStreamInfer(gen(), timeout=60):
            message = response.error_message
            if message and not message.startswith(_STREAM_ERROR_ALLOWED):
                tally.fail(f"ModelStreamInfer error {message!r}")
            final = response.infer_response.parameters.get("triton_final_response")
            finals += final is not None and final.bool_param
        code = grpc.StatusCode.OK
        # Every request of the stream ends with a final response, an error's included.
        if finals != len(requests):
            tally.fail(f"ModelStreamInfer: {finals} final responses to {len(requests)} requests: {requests}")
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code not in _GRPC_ALLOWED:
            tally.fail(f"ModelStreamInfer {code.name} {exc.details()!r}")
    tally.grpc["stream:" + code.name] = tally.grpc.get("stream:" + code.name, 0) + 1


async def _well_formed(
    session: aiohttp.ClientSession,
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
    base: str,
    stop: asyncio.Event,
    tally: Tally,
) -> None:
    """One good request every 50 ms, alternating between the surfaces; each must succeed."""
    body = json.dumps({"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 4}).encode()
    good = pb.ModelInferRequest(model_name=MODEL)
    tensor = good.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"the quick brown fox")
    good.parameters["max_tokens"].int64_param = 4
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if i % 2:
                async with session.post(
                    base + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    doc = await r.json()
                    if r.status != 200 or doc["usage"]["completion_tokens"] != 4:
                        tally.fail(f"well-formed HTTP request got {r.status}: {doc}")
                    else:
                        tally.good += 1
            else:
                await stub.ModelInfer(good, timeout=60)
                tally.good += 1
        except (aiohttp.ClientError, grpc.aio.AioRpcError) as exc:
            tally.fail(f"well-formed request failed: {exc!r}")
        await asyncio.sleep(0.05)


def _router_active(router: Instance) -> float:
    with urllib.request.urlopen(f"http://{router.metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tokenyard_router_active_requests")
    )


async def _active_blocks(worker: Instance) -> int:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        load = await worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(
            worker_pb2.GetLoadRequest(), timeout=10
        )
    return sum(int(rank.active_blocks) for rank in load.ranks)


async def _eventually(check: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("cases", [1500, pytest.param(10_000, marks=pytest.mark.slow)])
async def test_fuzzed_requests_get_client_errors_and_leave_nothing_behind(
    deployment: Deployment, cases: int
) -> None:
    rng = random.Random(SEED + cases)
    tally = Tally()
    stop = asyncio.Event()
    frontend_proc = deployment.procs[-1]
    # Every case is drawn up front so that a run's cases depend on the seed alone.
    plan: list[Any] = []
    for _ in range(cases):
        kind = rng.randrange(10)
        if kind < 6:
            plan.append(http_case(rng))
        elif kind < 9:
            plan.append(kserve_case(rng))
        else:
            plan.append([kserve_case(rng) for _ in range(rng.randrange(1, 5))])
    plan.extend(_huge_cases(full=cases >= 10_000))
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        aiohttp.ClientSession(timeout=timeout) as good_session,
        grpc.aio.insecure_channel(
            deployment.frontend.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        ) as channel,
    ):
        stub: pb_grpc.GRPCInferenceServiceAsyncStub = pb_grpc.GRPCInferenceServiceStub(channel)
        good_loop = asyncio.create_task(_well_formed(good_session, stub, deployment.http, stop, tally))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(plan)):
            queue.put_nowait(i)

        async def fuzz() -> None:
            while not queue.empty():
                case = plan[queue.get_nowait()]
                try:
                    if isinstance(case, HttpCase):
                        await _send_http(session, deployment.http, case, tally)
                    elif isinstance(case, list):
                        await _send_stream(stub, case, tally)
                    else:
                        await _send_infer(stub, case, tally)
                except Exception as exc:
                    tally.fail(f"{exc!r} for {str(case)[:400]!r}")

        try:
            await asyncio.gather(*(fuzz() for _ in range(PARALLEL)))
        finally:
            stop.set()
            await good_loop
    elapsed = time.monotonic() - started
    print(f"{cases} cases in {elapsed:.1f}s; HTTP {tally.http}; gRPC {tally.grpc}; well-formed {tally.good}")
    assert frontend_proc.proc.poll() is None, frontend_proc.output()
    assert not tally.failures, "\n".join(tally.failures)
    assert tally.good > 0
    # Both kinds of answers happened: the generators reach past validation too.
    assert tally.http.get(200, 0) > 0 and tally.http.get(400, 0) > 0, tally.http
    assert tally.grpc.get("OK", 0) > 0 and tally.grpc.get("INVALID_ARGUMENT", 0) > 0, tally.grpc
    await _eventually(lambda: _router_active(deployment.router) == 0, "the router has no active requests")
    for worker in deployment.workers:
        await _eventually(
            functools.partial(_zero_blocks, worker), f"worker {worker.address} has no active blocks"
        )
    assert "Traceback" not in frontend_proc.output(), frontend_proc.output()[-5000:]


async def _zero_blocks(worker: Instance) -> bool:
    return await _active_blocks(worker) == 0
