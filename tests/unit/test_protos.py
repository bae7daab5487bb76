"""The contracts in protos/: generated code is current, buf lint is clean, and every service
has the RPCs (and streaming kinds) its clients are written against."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from tokenyard.api.gms.v1 import gms_pb2
from tokenyard.api.kserve.v2 import grpc_service_pb2
from tokenyard.api.planner.v1 import planner_pb2
from tokenyard.api.router.v1 import router_pb2
from tokenyard.api.worker.v1 import worker_pb2

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"

OUR_FILES: list[FileDescriptor] = [
    worker_pb2.DESCRIPTOR,
    router_pb2.DESCRIPTOR,
    planner_pb2.DESCRIPTOR,
    gms_pb2.DESCRIPTOR,
]

# (client streaming, server streaming) per RPC: what the services and their clients rely on.
UNARY = (False, False)
SERVER_STREAM = (False, True)
BIDI = (True, True)
EXPECTED_RPCS: dict[str, dict[str, tuple[bool, bool]]] = {
    "tokenyard.api.worker.v1.WorkerService": {
        "Generate": SERVER_STREAM,
        "GenerateMux": BIDI,
        "SubscribeKvEvents": SERVER_STREAM,
        "SubscribeForwardPassMetrics": SERVER_STREAM,
        "GetLoad": UNARY,
        "Describe": UNARY,
        "FetchKvBlocks": SERVER_STREAM,
        "Drain": UNARY,
    },
    "tokenyard.api.router.v1.RouterService": {
        "Route": UNARY,
        "NotifyFirstToken": UNARY,
        "NotifyFinished": UNARY,
        "StreamNotifications": BIDI,
        "Dump": SERVER_STREAM,
        "QueryOverlap": UNARY,
        "SubscribeReplicaEvents": SERVER_STREAM,
    },
    "tokenyard.api.planner.v1.PlannerService": {
        "GetDecision": UNARY,
        "GetStatus": UNARY,
        "ListDecisions": UNARY,
    },
    "tokenyard.api.gms.v1.GmsService": {
        "GetInfo": UNARY,
        "GetEventHistory": UNARY,
        "Lock": SERVER_STREAM,
        "Unlock": UNARY,
        "Allocate": UNARY,
        "PutMetadata": UNARY,
        "DeleteMetadata": UNARY,
        "GetMetadata": UNARY,
        "ListMetadata": UNARY,
        "Commit": UNARY,
        "Import": UNARY,
    },
    "inference.GRPCInferenceService": {
        "ServerLive": UNARY,
        "ServerReady": UNARY,
        "ModelReady": UNARY,
        "ServerMetadata": UNARY,
        "ModelMetadata": UNARY,
        "ModelInfer": UNARY,
        "ModelStreamInfer": BIDI,
        "ModelConfig": UNARY,
        "ModelStatistics": UNARY,
        "RepositoryIndex": UNARY,
    },
}


def _load_gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _all_enums(file: FileDescriptor) -> Iterator[EnumDescriptor]:
    yield from file.enum_types_by_name.values()

    def nested(message: Descriptor) -> Iterator[EnumDescriptor]:
        yield from message.enum_types
        for child in message.nested_types:
            yield from nested(child)

    for message in file.message_types_by_name.values():
        yield from nested(message)


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def test_generated_code_matches_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, "tools/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_drift_check_reports_changed_missing_and_stale_files(tmp_path: Path) -> None:
    gen_protos = _load_gen_protos()
    fresh = tmp_path / "fresh"
    committed = tmp_path / "committed"
    gen_protos.generate(fresh)
    shutil.copytree(fresh, committed)
    assert gen_protos.differences(fresh, committed) == []

    router_stub = committed / "tokenyard/api/router/v1/router_pb2.py"
    router_stub.write_text(router_stub.read_text() + "# edited by hand\n")
    (committed / "tokenyard/api/gms/v1/gms_pb2.pyi").unlink()
    stale = committed / "tokenyard/api/old/v1/old_pb2.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("")

    assert gen_protos.differences(fresh, committed) == [
        "missing:  lib/tokenyard/api/gms/v1/gms_pb2.pyi",
        "stale:    lib/tokenyard/api/old/v1/old_pb2.py (no proto produces it)",
        "changed:  lib/tokenyard/api/router/v1/router_pb2.py (+0 -1 lines)",
    ]


def test_buf_lint_is_clean() -> None:
    if not BUF.is_file():
        pytest.fail(f"buf is missing at {BUF.relative_to(ROOT)}: run `make install`")
    result = subprocess.run(
        [str(BUF), "lint", "protos"], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


@pytest.mark.parametrize("service_name", sorted(EXPECTED_RPCS))
def test_service_has_the_expected_rpcs_and_streaming_kinds(service_name: str) -> None:
    files = [*OUR_FILES, grpc_service_pb2.DESCRIPTOR]
    services = {s.full_name: s for f in files for s in f.services_by_name.values()}
    service = services[service_name]

    actual = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}

    assert actual == EXPECTED_RPCS[service_name]


def test_each_file_holds_one_service_in_a_versioned_package_matching_its_folder() -> None:
    for file in OUR_FILES:
        assert len(file.services_by_name) == 1, file.name
        folder = file.name.rsplit("/", 1)[0]
        assert file.package == folder.replace("/", "."), file.name
        assert re.fullmatch(r"tokenyard\.api\.[a-z]+\.v[0-9]+", file.package), file.name


def test_each_rpc_has_its_own_request_and_response_pair() -> None:
    for file in OUR_FILES:
        for service in file.services_by_name.values():
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request"
                assert method.output_type.name == f"{method.name}Response"


def test_every_enum_starts_with_unspecified_and_prefixes_its_values() -> None:
    enums = [e for file in OUR_FILES for e in _all_enums(file)]
    assert len(enums) >= 10

    for enum in enums:
        prefix = _upper_snake(enum.name)
        assert enum.values[0].number == 0, enum.full_name
        assert enum.values[0].name == f"{prefix}_UNSPECIFIED", enum.full_name
        assert all(v.name.startswith(f"{prefix}_") for v in enum.values), enum.full_name
