"""Which identity may call which RPC under mTLS, and the settings that turn TLS on."""

from __future__ import annotations

import os

import pytest

from tokenyard.api.planner.v1 import planner_pb2
from tokenyard.api.router.v1 import router_pb2
from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.common.access import RULES, accepted, allowed
from tokenyard.common.certs import IDENTITIES
from tokenyard.deploy.probe import env_tls_file
from tokenyard.router.config import RouterSettings
from tokenyard.worker.config import WorkerSettings

pytestmark = pytest.mark.unit

W = "/tokenyard.api.worker.v1.WorkerService/"
R = "/tokenyard.api.router.v1.RouterService/"
P = "/tokenyard.api.planner.v1.PlannerService/"


def _methods() -> list[str]:
    out = []
    for module, name in (
        (worker_pb2, "WorkerService"),
        (router_pb2, "RouterService"),
        (planner_pb2, "PlannerService"),
    ):
        service = module.DESCRIPTOR.services_by_name[name]
        out += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return out


def test_every_service_rpc_has_a_rule() -> None:
    # An RPC missing here is refused to all but admin: a new RPC needs a decision in RULES.
    missing = [m for m in _methods() if m not in RULES]
    assert missing == []
    assert set(RULES) <= set(_methods())


@pytest.mark.parametrize(
    ("method", "callers"),
    [
        (W + "Generate", {"frontend"}),
        (W + "FetchKvBlocks", {"worker"}),
        (W + "SubscribeKvEvents", {"router"}),
        (W + "Drain", {"planner"}),
        (R + "Route", {"frontend"}),
        (R + "SubscribeReplicaEvents", {"router"}),
        (R + "Dump", set()),
        (P + "GetStatus", set()),
    ],
)
def test_an_rpc_takes_its_callers_and_admin_only(method: str, callers: set[str]) -> None:
    for identity in IDENTITIES:
        assert allowed(method, identity) == (identity in callers or identity == "admin"), identity
    assert not allowed(method, None)
    assert accepted(method) == ", ".join(sorted({*callers, "admin"}))


def test_health_is_open_to_any_certificate_but_not_to_none() -> None:
    check = "/grpc.health.v1.Health/Check"
    assert all(allowed(check, identity) for identity in IDENTITIES)
    assert not allowed(check, None)


def test_unlisted_rpcs_are_for_admin_only() -> None:
    assert not allowed(W + "SomethingNew", "frontend")
    assert allowed(W + "SomethingNew", "admin")


def test_tls_settings_come_from_flags_the_service_env_or_the_shared_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENYARD_TLS_CA", "/shared/ca.crt")
    monkeypatch.setenv("TOKENYARD_TLS_CERT", "/shared/service.crt")
    assert RouterSettings().tls_ca == "/shared/ca.crt"
    assert WorkerSettings().tls_cert == "/shared/service.crt"
    monkeypatch.setenv("TOKENYARD_ROUTER_TLS_CERT", "/router/router.crt")
    assert RouterSettings().tls_cert == "/router/router.crt"
    assert RouterSettings(tls_cert="/flag.crt").tls_cert == "/flag.crt"
    assert WorkerSettings().tls_key == ""


def test_a_probe_presents_the_certificate_of_the_mtls_service_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in [k for k in os.environ if k.startswith("TOKENYARD_")]:
        monkeypatch.delenv(key)
    # The frontend's port is plaintext: its certificate is not the probe's.
    monkeypatch.setenv("TOKENYARD_FRONTEND_TLS_CERT", "/tls/frontend.crt")
    assert env_tls_file("cert") == ""
    monkeypatch.setenv("TOKENYARD_WORKER_TLS_CERT", "/tls/worker.crt")
    assert env_tls_file("cert") == "/tls/worker.crt"
    monkeypatch.setenv("TOKENYARD_TLS_CERT", "/tls/admin.crt")
    assert env_tls_file("cert") == "/tls/admin.crt"
