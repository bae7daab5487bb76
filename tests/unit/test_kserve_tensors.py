"""KServe tensors to a generation request: the input sets of the common clients."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.generation import Endpoint
from tokenyard.frontend.kserve_tensors import build_request, parse_infer_request

pytestmark = pytest.mark.unit


def _request(*inputs: tuple[str, str, object]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="r1")
    for name, datatype, value in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[1])
        if datatype == "BYTES":
            assert isinstance(value, bytes)
            tensor.contents.bytes_contents.append(value)
        elif datatype == "BOOL":
            tensor.contents.bool_contents.append(bool(value))
        else:
            assert isinstance(value, int)
            tensor.contents.int_contents.append(value)
    return request


def test_tensorrtllm_input_set_with_deterministic_lengths() -> None:
    # What genai-perf sends for --backend tensorrtllm --output-tokens-mean-deterministic.
    parsed = parse_infer_request(
        _request(
            ("text_input", "BYTES", b"hello"),
            ("max_tokens", "INT32", 32),
            ("min_length", "INT32", 32),
            ("stream", "BOOL", True),
            ("exclude_input_in_output", "BOOL", True),
        )
    )
    request = build_request(parsed, Endpoint.KSERVE_STREAM_INFER)
    assert (request.stop.max_tokens, request.stop.min_tokens, request.stream) == (32, 32, True)


def test_vllm_input_set_reads_sampling_parameters_json() -> None:
    sampling = json.dumps({"max_tokens": 12, "min_tokens": 12, "ignore_eos": True}).encode()
    parsed = parse_infer_request(
        _request(
            ("text_input", "BYTES", b"hello"),
            ("sampling_parameters", "BYTES", sampling),
            ("stream", "BOOL", False),
            ("exclude_input_in_output", "BOOL", True),
        )
    )
    request = build_request(parsed, Endpoint.KSERVE_INFER)
    assert (request.stop.max_tokens, request.stop.min_tokens, request.stop.ignore_eos) == (12, 12, True)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda r: r.inputs[0].shape.__setitem__(0, 2), "holds 2 elements"),
        (
            lambda r: r.inputs[0].contents.bytes_contents.append(b"second prompt"),
            "2 elements where the shape holds one",
        ),
        (lambda r: r.inputs[1].contents.int_contents.append(9), "2 elements where the shape holds one"),
        (lambda r: r.inputs[1].contents.int64_contents.append(9), "more than one contents field"),
    ],
)
def test_a_batch_is_refused_rather_than_served_in_part(mutate: Any, fragment: str) -> None:
    request = _request(("text_input", "BYTES", b"hello"), ("max_tokens", "INT32", 8))
    mutate(request)
    with pytest.raises(InvalidArgument, match=fragment):
        parse_infer_request(request)


def test_raw_contents_of_more_than_one_element_are_refused() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    request.raw_input_contents.extend([struct.pack("<I", 2) + b"hi", struct.pack("<ii", 4, 5)])
    with pytest.raises(InvalidArgument, match="8 bytes of raw data for one 4-byte element"):
        parse_infer_request(request)
    request.raw_input_contents[1] = struct.pack("<i", 4)
    assert parse_infer_request(request).prompt == "hi"
