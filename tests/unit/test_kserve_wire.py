"""Our KServe v2 contract is wire-compatible with tritonclient's own generated classes.

tritonclient's classes and ours both define package `inference` in protobuf's default
descriptor pool, and the pool refuses a second definition of the same names, so the two
cannot be imported into one process. tritonclient therefore runs in a child process
(`_triton_side`), fed with and answering in JSON; the bytes cross as base64.
"""

from __future__ import annotations

import base64
import inspect
import json
import struct
import subprocess
import sys
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from google.protobuf.message import Message

from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import model_config_pb2 as mc

pytestmark = pytest.mark.unit

OUR_FILES = [pb.DESCRIPTOR, mc.DESCRIPTOR]
U64_MAX = 2**64 - 1


def _describe(files: list[FileDescriptor]) -> dict[str, Any]:
    """The wire-relevant shape of every message, enum and service in `files`.

    Self-contained (imports inside) because it also runs in the tritonclient process.
    """
    from google.protobuf import descriptor_pb2

    messages: dict[str, Any] = {}
    enums: dict[str, dict[str, int]] = {}
    services: dict[str, Any] = {}

    def visit_enum(enum: EnumDescriptor) -> None:
        enums[enum.full_name] = {v.name: v.number for v in enum.values}

    def visit_message(message: Descriptor) -> None:
        proto = descriptor_pb2.DescriptorProto()
        message.CopyToProto(proto)
        fields = {}
        for field in message.fields:
            referenced = field.message_type or field.enum_type
            fields[field.name] = {
                "number": field.number,
                "type": field.type,
                "repeated": field.is_repeated,
                "type_name": referenced.full_name if referenced is not None else "",
                "oneof": field.containing_oneof.name if field.containing_oneof is not None else "",
            }
        messages[message.full_name] = {
            "fields": fields,
            "reserved": sorted(n for r in proto.reserved_range for n in range(r.start, r.end)),
            "map_entry": message.GetOptions().map_entry,
        }
        for enum in message.enum_types:
            visit_enum(enum)
        for nested in message.nested_types:
            visit_message(nested)

    for file in files:
        for enum in file.enum_types_by_name.values():
            visit_enum(enum)
        for message in file.message_types_by_name.values():
            visit_message(message)
        for service in file.services_by_name.values():
            services[service.full_name] = {
                m.name: {
                    "input": m.input_type.full_name,
                    "output": m.output_type.full_name,
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                }
                for m in service.methods
            }
    return {"messages": messages, "enums": enums, "services": services}


def _triton_side() -> None:
    """Child process: answers a JSON list of operations with tritonclient's classes."""
    import base64
    import json
    import sys

    import numpy as np
    import tritonclient.grpc as triton  # type: ignore[import-untyped]
    from google.protobuf import descriptor_pool, json_format, message_factory
    from tritonclient.grpc import _utils, model_config_pb2, service_pb2

    def message_class(full_name: str) -> Any:
        return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name))

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    answers: list[Any] = []
    for op in json.load(sys.stdin):
        if op["op"] == "describe":
            answers.append(_describe([service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR]))
        elif op["op"] == "parse":
            parsed = message_class(op["type"]).FromString(base64.b64decode(op["data"]))
            answers.append(
                {
                    "dict": json_format.MessageToDict(parsed, preserving_proto_field_name=True),
                    "data": b64(parsed.SerializeToString(deterministic=True)),
                }
            )
        elif op["op"] == "build":
            built = json_format.ParseDict(op["dict"], message_class(op["type"])())
            answers.append(b64(built.SerializeToString(deterministic=True)))
        elif op["op"] == "client_request":
            # What InferenceServerClient.infer/async_stream_infer put on the wire.
            text = triton.InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([op["prompt"].encode()], dtype=np.object_))
            max_tokens = triton.InferInput("max_tokens", [1], "INT32")
            max_tokens.set_data_from_numpy(np.array([op["max_tokens"]], dtype=np.int32))
            stream = triton.InferInput("stream", [1], "BOOL")
            stream.set_data_from_numpy(np.array([True], dtype=np.bool_))
            request = _utils._get_inference_request(
                model_name=op["model"],
                inputs=[text, max_tokens, stream],
                model_version="",
                request_id=op["id"],
                outputs=[triton.InferRequestedOutput("text_output")],
                sequence_id=op["sequence_id"],
                sequence_start=True,
                sequence_end=False,
                priority=op["priority"],
                timeout=None,
                parameters=op["parameters"],
            )
            answers.append(b64(request.SerializeToString(deterministic=True)))
        elif op["op"] == "client_result":
            # How InferResult hands a response to client code.
            response = service_pb2.ModelInferResponse.FromString(base64.b64decode(op["data"]))
            result = triton.InferResult(response)
            outputs: dict[str, Any] = {}
            for name in op["outputs"]:
                array = result.as_numpy(name)
                values = array.flatten().tolist()
                outputs[name] = {
                    "shape": list(array.shape),
                    "values": [v.decode() if isinstance(v, bytes) else v for v in values],
                }
            final = result.get_response().parameters["triton_final_response"].bool_param
            answers.append({"outputs": outputs, "id": result.get_response().id, "final": final})
    json.dump(answers, sys.stdout)


def _run_triton(ops: list[dict[str, Any]]) -> list[Any]:
    source = "\n".join(
        [
            "from __future__ import annotations",
            "from typing import Any",
            inspect.getsource(_describe),
            inspect.getsource(_triton_side),
            "_triton_side()",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", source],
        input=json.dumps(ops),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answers: list[Any] = json.loads(result.stdout)
    assert len(answers) == len(ops)
    return answers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _bytes_element(value: bytes) -> bytes:
    """One BYTES tensor element in raw form: a 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(value)) + value


def _assert_triton_reads_it_identically(messages: list[Message]) -> list[dict[str, Any]]:
    """Ours -> bytes -> tritonclient: same values, and the same bytes when it writes them back."""
    answers = _run_triton(
        [
            {
                "op": "parse",
                "type": m.DESCRIPTOR.full_name,
                "data": _b64(m.SerializeToString(deterministic=True)),
            }
            for m in messages
        ]
    )
    for message, answer in zip(messages, answers, strict=True):
        assert answer["dict"] == _as_dict(message)
        assert base64.b64decode(answer["data"]) == message.SerializeToString(deterministic=True)
    return [a["dict"] for a in answers]


@pytest.fixture(scope="module")
def triton_shape() -> dict[str, Any]:
    shape: dict[str, Any] = _run_triton([{"op": "describe"}])[0]
    return shape


def test_service_and_methods_match_tritonclient(triton_shape: dict[str, Any]) -> None:
    ours = _describe(OUR_FILES)["services"]
    assert list(ours) == ["inference.GRPCInferenceService"]
    theirs = triton_shape["services"]["inference.GRPCInferenceService"]

    for name, method in ours["inference.GRPCInferenceService"].items():
        assert method == theirs[name], name
    assert set(ours["inference.GRPCInferenceService"]) == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    }
    assert (
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == "inference.GRPCInferenceService"
    )


def test_every_message_field_has_tritons_number_name_and_type(triton_shape: dict[str, Any]) -> None:
    ours = _describe(OUR_FILES)["messages"]
    assert len(ours) > 40

    for name, message in ours.items():
        assert name in triton_shape["messages"], f"{name} is not a Triton message"
        theirs = triton_shape["messages"][name]
        assert message["map_entry"] == theirs["map_entry"], name
        for field_name, field in message["fields"].items():
            assert field == theirs["fields"].get(field_name), f"{name}.{field_name}"
        # A Triton field we leave out keeps its number reserved, so nothing else can take it.
        ours_numbers = {f["number"] for f in message["fields"].values()}
        left_out = {f["number"] for f in theirs["fields"].values()} - ours_numbers
        unreserved = left_out - set(message["reserved"])
        assert not unreserved, f"{name} leaves out Triton fields {sorted(unreserved)} without reserving them"


def test_every_enum_value_has_tritons_number(triton_shape: dict[str, Any]) -> None:
    ours = _describe(OUR_FILES)["enums"]
    assert "inference.DataType" in ours

    for name, values in ours.items():
        assert values == triton_shape["enums"][name], name


def _infer_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="smollm2", model_version="1", id="req-42")
    request.parameters["sequence_start"].bool_param = True
    request.parameters["timeout"].int64_param = -5
    request.parameters["stop"].string_param = "</s>"
    request.parameters["temperature"].double_param = 0.125
    request.parameters["priority"].uint64_param = U64_MAX
    request.parameters["no_value"].CopyFrom(pb.InferParameter())
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    text.parameters["binary_data_size"].int64_param = 9
    max_tokens = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    max_tokens.contents.int_contents.append(64)
    output = request.outputs.add(name="text_output")
    output.parameters["binary_data"].bool_param = False
    request.raw_input_contents.append(_bytes_element("héllo".encode()))
    return request


def _infer_response() -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="smollm2", model_version="1", id="req-42")
    response.parameters["triton_final_response"].bool_param = True
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.outputs.add(name="finish_reason", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(_bytes_element("wörld".encode()))
    response.raw_output_contents.append(_bytes_element(b"stop"))
    typed = response.outputs.add(name="every_type", datatype="FP64", shape=[1])
    typed.parameters["scale"].double_param = 1.5
    typed.contents.bool_contents.append(True)
    typed.contents.int_contents.append(-7)
    typed.contents.int64_contents.append(-(2**40))
    typed.contents.uint_contents.append(2**32 - 1)
    typed.contents.uint64_contents.append(U64_MAX)
    typed.contents.fp32_contents.append(0.5)
    typed.contents.fp64_contents.append(0.1)
    typed.contents.bytes_contents.append(b"\x00\xff")
    return response


def _model_config_response() -> pb.ModelConfigResponse:
    config = mc.ModelConfig(
        name="smollm2",
        platform="tokenyard",
        backend="tokenyard",
        max_batch_size=0,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        response_cache=mc.ModelResponseCache(enable=True),
    )
    config.input.add(name="text_input", data_type=mc.TYPE_STRING, dims=[1])
    config.input.add(name="stream", data_type=mc.TYPE_BOOL, dims=[1], optional=True)
    config.input.add(name="max_tokens", data_type=mc.TYPE_INT32, dims=[1], optional=True)
    config.input.add(name="embedding", data_type=mc.TYPE_BF16, dims=[-1, 4], format=mc.ModelInput.FORMAT_NCHW)
    config.output.add(name="text_output", data_type=mc.TYPE_STRING, dims=[-1])
    config.parameters["kv_cache_block_size"].string_value = "64"
    config.instance_group.add(name="workers", kind=mc.ModelInstanceGroup.KIND_MODEL, count=2, gpus=[0, 1])
    config.dynamic_batching.max_queue_delay_microseconds = 100
    config.dynamic_batching.priority_queue_policy[2].CopyFrom(
        mc.ModelQueuePolicy(timeout_action=mc.ModelQueuePolicy.DELAY, max_queue_size=8)
    )
    return pb.ModelConfigResponse(config=config)


def _model_metadata_response() -> pb.ModelMetadataResponse:
    response = pb.ModelMetadataResponse(name="smollm2", versions=["1"], platform="tokenyard")
    response.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    response.inputs.add(name="stream", datatype="BOOL", shape=[1])
    response.outputs.add(name="text_output", datatype="BYTES", shape=[-1, 1])
    return response


def test_infer_request_and_response_read_identically_in_tritonclient() -> None:
    request_dict, response_dict = _assert_triton_reads_it_identically([_infer_request(), _infer_response()])

    parameters = request_dict["parameters"]
    assert parameters["priority"] == {"uint64_param": str(U64_MAX)}
    assert parameters["temperature"] == {"double_param": 0.125}
    assert parameters["timeout"] == {"int64_param": "-5"}
    assert parameters["no_value"] == {}
    assert base64.b64decode(request_dict["raw_input_contents"][0]) == _bytes_element("héllo".encode())
    contents = response_dict["outputs"][2]["contents"]
    assert contents["uint64_contents"] == [str(U64_MAX)]
    assert contents["fp64_contents"] == [0.1]


def test_stream_config_and_metadata_responses_read_identically_in_tritonclient() -> None:
    error = pb.ModelStreamInferResponse(error_message="model 'nope' not found")
    streamed = pb.ModelStreamInferResponse(infer_response=_infer_response())
    statistics = pb.ModelStatisticsResponse()
    stats = statistics.model_stats.add(name="smollm2", version="1", inference_count=3, last_inference=1700)
    stats.inference_stats.success.CopyFrom(pb.StatisticDuration(count=3, ns=2_000_000))
    stats.response_stats["0"].compute_infer.CopyFrom(pb.StatisticDuration(count=1, ns=5))
    index = pb.RepositoryIndexResponse()
    index.models.add(name="smollm2", version="1", state="READY")

    dicts = _assert_triton_reads_it_identically(
        [error, streamed, _model_config_response(), _model_metadata_response(), statistics, index]
    )

    assert dicts[0] == {"error_message": "model 'nope' not found"}
    assert dicts[1]["infer_response"]["parameters"]["triton_final_response"] == {"bool_param": True}
    config = dicts[2]["config"]
    assert config["model_transaction_policy"] == {"decoupled": True}
    assert config["input"][1] == {"name": "stream", "data_type": "TYPE_BOOL", "dims": ["1"], "optional": True}
    assert config["input"][3]["data_type"] == "TYPE_BF16"
    assert config["instance_group"][0]["kind"] == "KIND_MODEL"
    assert dicts[3]["outputs"][0]["shape"] == ["-1", "1"]


def test_what_tritonclient_sends_parses_in_our_classes() -> None:
    data = _run_triton(
        [
            {
                "op": "client_request",
                "model": "smollm2",
                "id": "req-7",
                "prompt": "Hi ✓",
                "max_tokens": 32,
                "sequence_id": 9,
                "priority": 2**63 + 5,
                "parameters": {"temperature": 0.25, "top_k": 40, "stop": "</s>", "echo": False},
            }
        ]
    )[0]

    request = pb.ModelInferRequest.FromString(base64.b64decode(data))

    assert (request.model_name, request.id) == ("smollm2", "req-7")
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [
        ("text_input", "BYTES", [1]),
        ("max_tokens", "INT32", [1]),
        ("stream", "BOOL", [1]),
    ]
    assert not any(i.HasField("contents") for i in request.inputs)
    assert list(request.raw_input_contents) == [
        _bytes_element("Hi ✓".encode()),
        struct.pack("<i", 32),
        b"\x01",
    ]
    assert [o.name for o in request.outputs] == ["text_output"]
    p = request.parameters
    assert p["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert p["priority"].uint64_param == 2**63 + 5
    assert p["sequence_id"].int64_param == 9
    assert p["sequence_start"].bool_param is True
    assert p["sequence_end"].WhichOneof("parameter_choice") == "bool_param"
    assert p["temperature"].WhichOneof("parameter_choice") == "double_param"
    assert p["temperature"].double_param == 0.25
    assert p["top_k"].int64_param == 40
    assert p["stop"].string_param == "</s>"
    assert p["echo"].WhichOneof("parameter_choice") == "bool_param"


def test_tritonclient_reads_our_response_outputs() -> None:
    response = _infer_response()
    del response.outputs[2]

    result = _run_triton(
        [
            {
                "op": "client_result",
                "data": _b64(response.SerializeToString()),
                "outputs": ["text_output", "finish_reason"],
            }
        ]
    )[0]

    assert result["outputs"] == {
        "text_output": {"shape": [1], "values": ["wörld"]},
        "finish_reason": {"shape": [1], "values": ["stop"]},
    }
    assert result["id"] == "req-42"
    assert result["final"] is True


def test_messages_tritonclient_builds_parse_in_our_classes() -> None:
    config = {
        "name": "llm",
        "max_batch_size": 8,
        "input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": ["-1"], "optional": False}],
        "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": ["-1"]}],
        "model_transaction_policy": {"decoupled": True},
        "parameters": {"block_size": {"string_value": "64"}},
    }
    stream = {
        "infer_response": {
            "id": "r1",
            "parameters": {
                "triton_final_response": {"bool_param": True},
                "seed": {"uint64_param": str(U64_MAX)},
                "ratio": {"double_param": 0.75},
            },
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": ["1"]}],
            "raw_output_contents": [_b64(_bytes_element(b"ok"))],
        }
    }
    built = _run_triton(
        [
            {"op": "build", "type": "inference.ModelConfigResponse", "dict": {"config": config}},
            {"op": "build", "type": "inference.ModelStreamInferResponse", "dict": stream},
        ]
    )

    parsed_config = pb.ModelConfigResponse.FromString(base64.b64decode(built[0])).config
    parsed_stream = pb.ModelStreamInferResponse.FromString(base64.b64decode(built[1]))

    assert parsed_config.max_batch_size == 8
    assert parsed_config.model_transaction_policy.decoupled is True
    assert parsed_config.input[0].data_type == mc.TYPE_STRING
    assert list(parsed_config.input[0].dims) == [-1]
    assert parsed_config.parameters["block_size"].string_value == "64"
    parameters = parsed_stream.infer_response.parameters
    assert parameters["triton_final_response"].bool_param is True
    assert parameters["seed"].WhichOneof("parameter_choice") == "uint64_param"
    assert parameters["seed"].uint64_param == U64_MAX
    assert parameters["ratio"].double_param == 0.75
    assert list(parsed_stream.infer_response.raw_output_contents) == [_bytes_element(b"ok")]


def test_a_full_triton_config_survives_a_round_trip_through_our_classes() -> None:
    # Fields we do not carry (sequence batching, optimization, warmup, metric tags) must not
    # be lost when a Triton config passes through our classes.
    config = {
        "name": "ensemble",
        "platform": "ensemble",
        "max_batch_size": 4,
        "sequence_batching": {
            "max_sequence_idle_microseconds": "5000000",
            "oldest": {"max_candidate_sequences": 4},
        },
        "optimization": {"priority": "PRIORITY_MAX", "cuda": {"graphs": True}},
        "model_warmup": [{"name": "w", "batch_size": 1, "count": 2}],
        "metric_tags": {"team": "serving"},
        "instance_group": [{"kind": "KIND_GPU", "count": 1, "rate_limiter": {"priority": 3}}],
    }
    original = _run_triton([{"op": "build", "type": "inference.ModelConfig", "dict": config}])[0]

    ours = mc.ModelConfig.FromString(base64.b64decode(original))
    assert ours.name == "ensemble" and ours.max_batch_size == 4
    assert not ours.HasField("dynamic_batching")

    back = _run_triton(
        [{"op": "parse", "type": "inference.ModelConfig", "data": _b64(ours.SerializeToString())}]
    )[0]
    assert back["dict"] == config
