"""Routing hints as clients send them: OpenAI bodies' ``nvext`` and KServe request parameters
become the request's session id and expected output length (which the frontend hands the router)."""

from __future__ import annotations

import pytest

from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.generation import Endpoint
from tokenyard.frontend.kserve_tensors import build_request, parse_infer_request
from tokenyard.frontend.openai_api import parse_chat, parse_completion

pytestmark = pytest.mark.unit


def test_openai_nvext_carries_the_hints() -> None:
    request, _ = parse_completion(
        {"model": "m", "prompt": "hi", "nvext": {"session_id": "chat-7", "expected_output_tokens": 64}}
    )
    assert (request.session_id, request.expected_output_tokens) == ("chat-7", 64)
    request, _ = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert (request.session_id, request.expected_output_tokens) == ("", None)
    for bad in ({"session_id": "x" * 257}, {"expected_output_tokens": 0}, {"session_id": 3}):
        with pytest.raises(InvalidArgument, match="nvext"):
            parse_completion({"model": "m", "prompt": "hi", "nvext": bad})


def kserve(**params: pb.InferParameter) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="r1", parameters=params)
    tensor = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"hi")
    return request


def test_kserve_parameters_carry_the_hints() -> None:
    parsed = parse_infer_request(
        kserve(
            session_id=pb.InferParameter(string_param="chat-7"),
            expected_output_tokens=pb.InferParameter(int64_param=64),
        )
    )
    request = build_request(parsed, Endpoint.KSERVE_INFER)
    assert (request.session_id, request.expected_output_tokens) == ("chat-7", 64)
    with pytest.raises(InvalidArgument, match="session_id"):
        build_request(
            parse_infer_request(kserve(session_id=pb.InferParameter(string_param="x" * 257))),
            Endpoint.KSERVE_INFER,
        )
