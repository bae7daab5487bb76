"""KServe v2 tensors of a text model: the request's inputs in, ``text_output`` and
``finish_reason`` out.

Input data comes either in ``raw_input_contents`` (what tritonclient always sends; then every
input uses it, in input order) or in each tensor's typed ``contents``. A BYTES element in raw
form is a 4-byte little-endian length and that many bytes, elements back to back.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import model_config_pb2 as mc
from tokenyard.common.errors import InvalidArgument, NotFound
from tokenyard.frontend.generation import Endpoint, GenerationRequest, Sampling, StopConditions
from tokenyard.frontend.openai_api import reject_lone_surrogates

# The KServe default for text models when the client names no max_tokens, as Triton's vLLM
# backend does (vLLM's own default).
DEFAULT_MAX_TOKENS = 16
# The one version every model has; "" (or no version) means it.
MODEL_VERSION = "1"


def check_model_version(model: str, version: str) -> None:
    """NotFound for a version the model does not have (Triton's answer), rather than serving
    version 1 to a client that asked for another."""
    if version not in ("", MODEL_VERSION):
        raise NotFound(
            f"the model {model!r} has no version {version[:40]!r} (its only version is {MODEL_VERSION})"
        )


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str  # KServe datatype name
    config_type: int  # Triton ModelConfig DataType
    optional: bool


INPUTS = (
    TensorSpec("text_input", "BYTES", mc.TYPE_STRING, False),
    TensorSpec("streaming", "BOOL", mc.TYPE_BOOL, True),
    TensorSpec("stream", "BOOL", mc.TYPE_BOOL, True),
    TensorSpec("max_tokens", "INT32", mc.TYPE_INT32, True),
    # TensorRT-LLM's name for min_tokens (genai-perf sends it for deterministic output lengths).
    TensorSpec("min_length", "INT32", mc.TYPE_INT32, True),
    TensorSpec("exclude_input_in_output", "BOOL", mc.TYPE_BOOL, True),
    TensorSpec("sampling_parameters", "BYTES", mc.TYPE_STRING, True),
)
OUTPUTS = (
    TensorSpec("text_output", "BYTES", mc.TYPE_STRING, False),
    TensorSpec("finish_reason", "BYTES", mc.TYPE_STRING, False),
)
_INPUT_NAMES = {spec.name for spec in INPUTS}
_INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_RAW_INT = {
    "INT8": "<b",
    "INT16": "<h",
    "INT32": "<i",
    "INT64": "<q",
    "UINT8": "<B",
    "UINT16": "<H",
    "UINT32": "<I",
    "UINT64": "<Q",
}


@dataclass(frozen=True, slots=True)
class TextInferRequest:
    """What a KServe request asks of a text model, before it becomes a GenerationRequest."""

    model: str
    request_id: str
    prompt: str
    stream: bool
    exclude_input: bool
    sampling: Mapping[str, Any] = field(default_factory=dict)


def _element_count(shape: Any) -> int:
    return math.prod(int(d) for d in shape) if len(shape) else 1


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    out: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 4 > end:
            raise InvalidArgument(f"input {name}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > end:
            raise InvalidArgument(f"input {name}: BYTES element of {length} bytes overruns the data")
        out.append(raw[pos : pos + length])
        pos += length
    return out


def _one(items: Sequence[Any], name: str) -> Any:
    if not items:
        raise InvalidArgument(f"input {name}: no data")
    if len(items) > 1:
        raise InvalidArgument(f"input {name}: {len(items)} elements where the shape holds one")
    return items[0]


def _one_raw(raw: bytes, size: int, name: str) -> None:
    if not raw:
        raise InvalidArgument(f"input {name}: no data")
    if len(raw) != size:
        raise InvalidArgument(f"input {name}: {len(raw)} bytes of raw data for one {size}-byte element")


def _first_value(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Any:
    """The one element of a tensor: bytes for BYTES, bool for BOOL, int for integers.

    One request is one prompt: a tensor of several elements (a batch) is refused rather than
    served in part."""
    name, dtype = tensor.name, tensor.datatype
    count = _element_count(tensor.shape)
    if count < 1:
        raise InvalidArgument(f"input {name}: shape {list(tensor.shape)} has no elements")
    if count > 1:
        raise InvalidArgument(
            f"input {name}: shape {list(tensor.shape)} holds {count} elements; one request takes one "
            "(shape [1] or [1, 1])"
        )
    if dtype == "BYTES":
        items = _bytes_elements(raw, name) if raw is not None else list(tensor.contents.bytes_contents)
        return _one(items, name)
    if dtype == "BOOL":
        if raw is not None:
            _one_raw(raw, 1, name)
            return raw[0] != 0
        return bool(_one(tensor.contents.bool_contents, name))
    if dtype in _INTEGER_TYPES:
        fmt = _RAW_INT[dtype]
        if raw is not None:
            _one_raw(raw, struct.calcsize(fmt), name)
            return struct.unpack(fmt, raw)[0]
        c = tensor.contents
        filled = [v for v in (c.int_contents, c.int64_contents, c.uint_contents, c.uint64_contents) if v]
        if len(filled) > 1:
            raise InvalidArgument(f"input {name}: data in more than one contents field")
        return int(_one(filled[0] if filled else [], name))
    raise InvalidArgument(f"input {name}: unsupported datatype {dtype}")


def parse_infer_request(request: pb.ModelInferRequest) -> TextInferRequest:
    check_model_version(request.model_name, request.model_version)
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw_contents)} entries for {len(request.inputs)} inputs; "
            "with raw contents every input must use them"
        )
    specs = {spec.name: spec for spec in INPUTS}
    values: dict[str, Any] = {}
    for i, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"unexpected input {tensor.name!r}; this model takes {', '.join(s.name for s in INPUTS)}"
            )
        if tensor.name in values:
            raise InvalidArgument(f"input {tensor.name!r} given twice")
        integer = spec.datatype == "INT32"
        if tensor.datatype != spec.datatype and not (integer and tensor.datatype in _INTEGER_TYPES):
            raise InvalidArgument(
                f"input {tensor.name}: datatype must be {spec.datatype}, got {tensor.datatype}"
            )
        values[tensor.name] = _first_value(tensor, raw_contents[i] if raw_contents else None)
    if "text_input" not in values:
        raise InvalidArgument("input text_input is required")
    prompt = values["text_input"].decode("utf-8", errors="replace")
    stream = bool(values.get("streaming", False) or values.get("stream", False))
    sampling: dict[str, Any] = _parameters(request.parameters)
    if "sampling_parameters" in values:
        sampling.update(_sampling_json(values["sampling_parameters"]))
    if "max_tokens" in values:
        sampling["max_tokens"] = values["max_tokens"]
    if "min_length" in values:
        sampling["min_tokens"] = values["min_length"]
    return TextInferRequest(
        model=request.model_name,
        request_id=request.id,
        prompt=prompt,
        stream=stream,
        exclude_input=bool(values.get("exclude_input_in_output", True)),
        sampling=sampling,
    )


# Request parameters that carry sampling options; everything else (sequence_id, priority,
# timeout, triton_enable_empty_final_response, custom floats...) is tolerated and ignored.
_SAMPLING_KEYS = {
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
    # Routing hints (as the OpenAI surface's ``nvext``).
    "session_id",
    "expected_output_tokens",
}


def _parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, param in params.items():
        if key not in _SAMPLING_KEYS:
            continue
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(param, which)
    return out


def _sampling_json(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"input sampling_parameters: not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("input sampling_parameters: nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("input sampling_parameters: must be a JSON object")
    reject_lone_surrogates(raw, doc, "input sampling_parameters")
    return {k: v for k, v in doc.items() if k in _SAMPLING_KEYS}


def _number(options: Mapping[str, Any], key: str, kind: type, lo: float, hi: float) -> Any:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise InvalidArgument(f"{key}: must be a number, got {value!r}") from None
        else:
            raise InvalidArgument(f"{key}: must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{key}: must be a finite number, got {value!r}")
    # The range first: a huge integer has no float, and a float of a large one (a uint64
    # seed) is not exact.
    if not lo <= value <= hi:
        raise InvalidArgument(f"{key}: must be in [{lo}, {hi}], got {_shorten(value)}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidArgument(f"{key}: must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _flag(options: Mapping[str, Any], key: str) -> bool:
    """A boolean option; anything but a boolean (1, "yes") is refused, not read as truthy."""
    value = options.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{key}: must be a boolean (true or false), got {_shorten(value)}")
    return value


def _shorten(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + ".."


def build_request(req: TextInferRequest, endpoint: Endpoint) -> GenerationRequest:
    o = req.sampling
    max_tokens = _number(o, "max_tokens", int, 1, 2**32 - 1)
    top_k = _number(o, "top_k", int, -1, 2**32 - 1)
    stop = o.get("stop")
    stop_strings: tuple[str, ...] = ()
    if isinstance(stop, str):
        stop_strings = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop_strings = tuple(stop)
    elif stop is not None:
        raise InvalidArgument("stop: must be a string or a list of strings")
    stop_ids = o.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in stop_ids
    ):
        raise InvalidArgument("stop_token_ids: must be a list of token ids")
    seed = _number(o, "seed", int, -(2**63), 2**64 - 1)
    return GenerationRequest(
        model=req.model,
        endpoint=endpoint,
        stream=req.stream,
        prompt=req.prompt,
        # As Triton's vLLM backend: the prompt is prepended to unary output only.
        echo=not req.exclude_input and not req.stream,
        sampling=Sampling(
            temperature=_number(o, "temperature", float, 0, 100),
            top_p=_number(o, "top_p", float, 0, 1),
            top_k=top_k if top_k and top_k > 0 else None,
            min_p=_number(o, "min_p", float, 0, 1),
            seed=None if seed is None else seed & (2**64 - 1),
            repetition_penalty=_number(o, "repetition_penalty", float, 0, 100),
            frequency_penalty=_number(o, "frequency_penalty", float, -2, 2),
            presence_penalty=_number(o, "presence_penalty", float, -2, 2),
        ),
        stop=StopConditions(
            max_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
            min_tokens=_number(o, "min_tokens", int, 0, 2**32 - 1) or 0,
            stop_token_ids=tuple(stop_ids),
            ignore_eos=_flag(o, "ignore_eos"),
            stop_strings=stop_strings,
        ),
        session_id=_session_id(o),
        expected_output_tokens=_number(o, "expected_output_tokens", int, 1, 2**32 - 1),
    )


def _session_id(options: Mapping[str, Any]) -> str:
    value = options.get("session_id", "")
    if not isinstance(value, str) or len(value) > 256:
        raise InvalidArgument("session_id: must be a string of at most 256 characters")
    return value


def _bytes_tensor(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<I", len(data)) + data


def infer_response(
    model: str, request_id: str, text: str, finish_reason: str, final: bool | None
) -> pb.ModelInferResponse:
    """One response: ``text_output`` and ``finish_reason``, one element each, as raw contents.

    ``final`` sets Triton's ``triton_final_response`` parameter (streams); None leaves it out.
    """
    response = pb.ModelInferResponse(
        model_name=model,
        model_version=MODEL_VERSION,
        id=request_id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=[1]),
            pb.ModelInferResponse.InferOutputTensor(name="finish_reason", datatype="BYTES", shape=[1]),
        ],
        raw_output_contents=[_bytes_tensor(text), _bytes_tensor(finish_reason)],
    )
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return response
