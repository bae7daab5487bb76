"""Service identity (mTLS) and client authentication (API keys) with real processes on loopback.

One deployment made by ``tokenyard certs``: a router, two mocker workers, a planner and a
frontend, each with its own certificate, the frontend with an API key; plus two impostors, real
worker processes registered in discovery as workers, one holding the *frontend's* certificate,
one none at all. Driven with the openai package, tritonclient and raw gRPC channels holding
various certificates.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.test_up import _free_block
from tests.fixtures.processes import ServiceProcess, run_to_exit
from tokenyard.api.planner.v1 import planner_pb2, planner_pb2_grpc
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.certs import write_bundle
from tokenyard.common.discovery import Instance, open_discovery
from tokenyard.common.tls import Tls
from tokenyard.deploy.state import READY_FILE

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
UNLISTED_MODEL = "impostor-model"
API_KEY = "sk-tokenyard-test-0123456789"
CHATS = 8
ROUTES = 12


@dataclass
class Deployment:
    certs: Path
    discovery: str
    router: Instance
    workers: list[Instance]
    impostor: Instance
    plaintext: Instance
    unlisted: Instance
    planner: Instance
    frontend: Instance
    procs: dict[str, ServiceProcess]

    def tls(self, identity: str) -> Tls:
        c = self.certs
        return Tls.from_paths(str(c / "ca.crt"), str(c / f"{identity}.crt"), str(c / f"{identity}.key"))

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://{self.frontend.metrics_address}/v1", api_key=key, max_retries=0, timeout=60
        )


def _tls_flags(certs: Path, identity: str) -> list[str]:
    return [
        "--tls-ca",
        str(certs / "ca.crt"),
        "--tls-cert",
        str(certs / f"{identity}.crt"),
        "--tls-key",
        str(certs / f"{identity}.key"),
    ]


async def _wait(discovery: str, service: str, count: int, procs: list[ServiceProcess]) -> list[Instance]:
    client = open_discovery(discovery)
    try:
        deadline = time.monotonic() + 60
        while True:
            found = await client.instances(service)
            if len(found) >= count:
                return found
            for proc in procs:
                if proc.proc.poll() is not None:
                    raise AssertionError(f"{proc.argv} exited:\n{proc.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} {service} instance(s) never registered")
            await asyncio.sleep(0.1)
    finally:
        await client.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("security")
    certs = root / "certs"
    write_bundle(certs)
    discovery = f"dir://{root / 'discovery'}"
    common = ["--port", "0", "--discovery", discovery]
    worker = ["worker", *common, "--metrics-port", "0", "--mocker-speedup-ratio", "0"]
    procs: dict[str, ServiceProcess] = {}

    def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> ServiceProcess:
        procs[name] = ServiceProcess(argv, root / f"{name}.log", env)
        return procs[name]

    try:
        start(
            "router",
            ["router", *common, "--metrics-port", "0", "--mode", "round-robin", *_tls_flags(certs, "router")],
        )
        start("worker-a", [*worker, *_tls_flags(certs, "worker")])
        start("worker-b", [*worker, *_tls_flags(certs, "worker")])
        start("planner", ["planner", *common, "--metrics-port", "0", *_tls_flags(certs, "planner")])
        # TLS and the key from the shared environment variables, as compose and Kubernetes set them.
        start(
            "frontend",
            ["frontend", *common, "--http-port", "0"],
            {
                "TOKENYARD_TLS_CA": str(certs / "ca.crt"),
                "TOKENYARD_TLS_CERT": str(certs / "frontend.crt"),
                "TOKENYARD_TLS_KEY": str(certs / "frontend.key"),
                "TOKENYARD_API_KEYS": API_KEY,
            },
        )
        everyone = list(procs.values())
        workers = asyncio.run(_wait(discovery, "worker", 2, everyone))
        # Started last, so that their records are the ones the real workers' are not.
        start("impostor", [*worker, *_tls_flags(certs, "frontend")])
        impostor = next(
            w
            for w in asyncio.run(_wait(discovery, "worker", 3, list(procs.values())))
            if w.instance_id not in {x.instance_id for x in workers}
        )
        # And one without any certificate at all (plaintext).
        start("plaintext", worker)
        everyone = list(procs.values())
        known = {x.instance_id for x in (*workers, impostor)}
        plaintext = next(
            w for w in asyncio.run(_wait(discovery, "worker", 4, everyone)) if w.instance_id not in known
        )
        # An impostor whose record names a model no real worker serves: it must not be listed.
        start("unlisted", [*worker, "--model", UNLISTED_MODEL, *_tls_flags(certs, "frontend")])
        everyone = list(procs.values())
        known.add(plaintext.instance_id)
        unlisted = next(
            w for w in asyncio.run(_wait(discovery, "worker", 5, everyone)) if w.instance_id not in known
        )
        d = Deployment(
            certs,
            discovery,
            asyncio.run(_wait(discovery, "router", 1, everyone))[0],
            workers,
            impostor,
            plaintext,
            unlisted,
            asyncio.run(_wait(discovery, "planner", 1, everyone))[0],
            asyncio.run(_wait(discovery, "frontend", 1, everyone))[0],
            procs,
        )
        _wait_serving(d)
        yield d
    finally:
        for proc in procs.values():
            proc.close()


def _wait_serving(d: Deployment) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with d.openai(API_KEY) as client:
                client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
            return
        except openai.APIError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the deployment never served: {exc}\n{d.procs['frontend'].output()}"
                ) from exc
            time.sleep(0.2)


def _counter(metrics_address: str, name: str) -> float:
    """The sum of a counter's samples on a /metrics page."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def _code(call: grpc.Future) -> grpc.StatusCode:  # type: ignore[type-arg]
    try:
        call.result()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ---- clients: API keys -----------------------------------------------------------------------


def test_a_chat_with_the_right_key_is_served_over_mtls(deployment: Deployment) -> None:
    with deployment.openai(API_KEY) as client:
        for _ in range(CHATS):
            chat = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=8,
            )
            assert chat.choices[0].message.content
    # None of them reached the impostors (with mTLS their records are never honoured).
    for impostor in (deployment.impostor, deployment.plaintext):
        assert _counter(impostor.metrics_address, "tokenyard_worker_requests_total") == 0
    served = sum(_counter(w.metrics_address, "tokenyard_worker_requests_total") for w in deployment.workers)
    assert served >= CHATS


@pytest.mark.parametrize("key", ["unused", API_KEY + "x", API_KEY[:-1]])
def test_a_wrong_key_gets_401_in_the_openai_shape(deployment: Deployment, key: str) -> None:
    with deployment.openai(key) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_no_key_gets_401_and_probes_stay_open(deployment: Deployment) -> None:
    http = f"http://{deployment.frontend.metrics_address}"
    request = urllib.request.Request(
        f"{http}/v1/chat/completions",
        data=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 401
    assert caught.value.headers["WWW-Authenticate"] == "Bearer"
    with caught.value:
        assert json.loads(caught.value.read())["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/metrics"):
        with urllib.request.urlopen(http + path, timeout=10) as response:
            assert response.status == 200, path


TRITON_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, model, key = sys.argv[1:4]
client = grpcclient.InferenceServerClient(url)
text = grpcclient.InferInput("text_input", [1], "BYTES")
text.set_data_from_numpy(np.array(["What is the capital of France?".encode()], dtype=object))
out = {"live": client.is_server_live()}
for name, headers in (("none", None), ("wrong", {"authorization": "Bearer nope-nope-nope-nope"}),
                      ("right", {"authorization": f"Bearer {key}"})):
    try:
        result = client.infer(model, [text], headers=headers, client_timeout=30)
        out[name] = result.as_numpy("text_output")[0].decode()
    except InferenceServerException as exc:
        out[name] = exc.status()
print(json.dumps(out))
"""


def test_kserve_needs_the_key_in_metadata(deployment: Deployment) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CLIENT, deployment.frontend.address, MODEL, API_KEY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    # Health (ServerLive) is open; inference is not.
    assert out["live"] is True
    assert out["none"] == "StatusCode.UNAUTHENTICATED"
    assert out["wrong"] == "StatusCode.UNAUTHENTICATED"
    assert out["right"] and not out["right"].startswith("StatusCode.")


# ---- services: mTLS identity -----------------------------------------------------------------


def _health_code(channel: grpc.Channel) -> grpc.StatusCode:
    stub = health_pb2_grpc.HealthStub(channel)
    return _code(stub.Check.future(health_pb2.HealthCheckRequest(), timeout=5))


def test_a_client_without_a_certificate_reaches_no_worker_router_or_planner(deployment: Deployment) -> None:
    ca = (deployment.certs / "ca.crt").read_bytes()
    for instance in (deployment.router, *deployment.workers, deployment.planner):
        with grpc.insecure_channel(instance.address) as channel:
            assert _health_code(channel) == grpc.StatusCode.UNAVAILABLE, instance
            code = _code(
                worker_pb2_grpc.WorkerServiceStub(channel).Describe.future(
                    worker_pb2.DescribeRequest(), timeout=5
                )
            )
            assert code == grpc.StatusCode.UNAVAILABLE
        # TLS that trusts the CA but shows no certificate of its own: refused in the handshake.
        with grpc.secure_channel(instance.address, grpc.ssl_channel_credentials(ca)) as channel:
            assert _health_code(channel) == grpc.StatusCode.UNAVAILABLE, instance
    with deployment.tls("admin").sync_channel(deployment.router.address, "router") as channel:
        assert _health_code(channel) == grpc.StatusCode.OK


def test_each_rpc_takes_only_the_identities_that_call_it(deployment: Deployment) -> None:
    d = deployment
    worker = d.workers[0]
    with d.tls("frontend").sync_channel(worker.address, "worker") as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        assert _code(stub.Describe.future(worker_pb2.DescribeRequest(), timeout=5)) == grpc.StatusCode.OK
        # Drain needs the admin (or the planner that scales workers).
        assert (
            _code(stub.Drain.future(worker_pb2.DrainRequest(), timeout=5))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        call = stub.FetchKvBlocks(worker_pb2.FetchKvBlocksRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with d.tls("worker").sync_channel(d.router.address, "router") as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        route = router_pb2.RouteRequest(request_id="r", model=MODEL, isl_tokens=1, dry_run=True)
        assert _code(router.Route.future(route, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    with d.tls("frontend").sync_channel(d.router.address, "router") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(router_pb2_grpc.RouterServiceStub(channel).Dump(router_pb2.DumpRequest(), timeout=5))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in (caught.value.details() or "")
    for identity, expected in (
        ("frontend", grpc.StatusCode.PERMISSION_DENIED),
        ("admin", grpc.StatusCode.OK),
    ):
        with d.tls(identity).sync_channel(d.planner.address, "planner") as channel:
            planner = planner_pb2_grpc.PlannerServiceStub(channel)
            assert _code(planner.GetStatus.future(planner_pb2.GetStatusRequest(), timeout=5)) == expected


def test_a_server_must_prove_the_service_it_is_dialled_as(deployment: Deployment) -> None:
    # The router's certificate is good, but it is not a worker's: the handshake fails.
    with deployment.tls("admin").sync_channel(deployment.router.address, "worker") as channel:
        assert _health_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_worker_record_without_a_worker_certificate_gets_no_requests(deployment: Deployment) -> None:
    d = deployment
    with d.tls("frontend").sync_channel(d.router.address, "router") as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        chosen = [
            stub.Route(
                router_pb2.RouteRequest(request_id=f"r{i}", model=MODEL, isl_tokens=16, dry_run=True),
                timeout=5,
            ).worker_id
            for i in range(ROUTES)
        ]
    # Round robin over what the router honours: both real workers, never an impostor.
    assert set(chosen) == {w.instance_id for w in d.workers}
    assert "proved its identity" in d.procs["router"].output()


def test_a_model_only_unproven_records_name_is_not_listed(deployment: Deployment) -> None:
    d = deployment
    with d.openai(API_KEY) as client:
        listed = {m.id for m in client.models.list()}
        assert listed == {MODEL}
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=UNLISTED_MODEL, prompt="hi", max_tokens=1)
    deadline = time.monotonic() + 20
    while "has not proven its record" not in d.procs["frontend"].output():
        assert time.monotonic() < deadline, d.procs["frontend"].output()
        time.sleep(0.1)
    assert _counter(d.unlisted.metrics_address, "tokenyard_worker_requests_total") == 0


def test_drain_needs_the_admin_identity(deployment: Deployment) -> None:
    # The impostor's port serves the frontend's certificate (with the loopback SANs): dial it by address.
    with deployment.tls("frontend").sync_channel(deployment.impostor.address, None) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        assert (
            _code(stub.Drain.future(worker_pb2.DrainRequest(), timeout=5))
            == grpc.StatusCode.PERMISSION_DENIED
        )
    with deployment.tls("admin").sync_channel(deployment.impostor.address, None) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        assert (
            _code(stub.Drain.future(worker_pb2.DrainRequest(grace_period_ms=0), timeout=10))
            == grpc.StatusCode.OK
        )


def test_probe_and_status_present_the_certificate_from_the_environment(deployment: Deployment) -> None:
    env = {
        "TOKENYARD_TLS_CA": str(deployment.certs / "ca.crt"),
        "TOKENYARD_TLS_CERT": str(deployment.certs / "admin.crt"),
        "TOKENYARD_TLS_KEY": str(deployment.certs / "admin.key"),
    }
    probe = run_to_exit(["probe", deployment.router.address], env=env)
    assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING"), probe.stderr
    plain = run_to_exit(["probe", deployment.router.address])
    assert (plain.returncode, plain.stdout.strip()) == (1, "UNREACHABLE")
    status = run_to_exit(
        ["status", "--discovery", deployment.discovery, "--json-output", "--service", "router"], env=env
    )
    assert [json.loads(line)["health"] for line in status.stdout.splitlines()] == ["SERVING"], status.stderr


@pytest.mark.parametrize("service", ["router", "frontend"])
def test_a_healthcheck_uses_the_certificate_of_the_container_it_runs_in(
    deployment: Deployment, service: str
) -> None:
    # What compose and Kubernetes set in each container: the service's own variables only. The
    # frontend's port serves clients in plaintext, so its probe must not use its certificate.
    c = deployment.certs
    prefix = f"TOKENYARD_{service.upper()}_TLS_"
    env = {
        prefix + "CA": str(c / "ca.crt"),
        prefix + "CERT": str(c / f"{service}.crt"),
        prefix + "KEY": str(c / f"{service}.key"),
    }
    address = deployment.router.address if service == "router" else deployment.frontend.address
    probe = run_to_exit(["probe", address], env=env)
    assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING"), probe.stderr


# ---- tokenyard up --tls --------------------------------------------------------------------------


def test_up_with_tls_serves_with_a_key_and_leaves_no_certificate_behind(tmp_path: Path) -> None:
    base = _free_block(12)
    state = tmp_path / "state"
    ports = {
        "--http-port": 0,
        "--grpc-port": 1,
        "--router-port": 2,
        "--planner-port": 4,
        "--gms-metrics-port": 6,
        "--worker-port": 7,
        "--worker-metrics-port": 9,
    }
    argv = [sys.executable, "-m", "tokenyard.cli", "up", "--engine", "mocker", "--workers", "1", "--tls"]
    argv += [
        "--discovery",
        f"dir://{tmp_path / 'discovery'}",
        "--state-dir",
        str(state),
        "--grace-period",
        "2",
    ]
    for flag, offset in ports.items():
        argv += [flag, str(base + offset)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENYARD_API_KEYS": API_KEY}
    for key in [k for k in env if k.startswith("TOKENYARD_") and "_TLS_" in k]:
        del env[key]
    with open(tmp_path / "up.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            http = f"http://127.0.0.1:{base}/v1"
            deadline = time.monotonic() + 120
            while not (state / READY_FILE).exists():
                assert proc.poll() is None, (tmp_path / "up.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
                time.sleep(0.2)
            assert sorted(p.name for p in (state / "tls").iterdir()) == sorted(
                [
                    "ca.crt",
                    *(
                        f"{i}.{ext}"
                        for i in ("admin", "frontend", "gms", "planner", "router", "worker")
                        for ext in ("crt", "key")
                    ),
                ]
            )
            with openai.OpenAI(base_url=http, api_key=API_KEY, max_retries=0, timeout=60) as client:
                chat = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                assert chat.choices[0].message.content
            with (
                openai.OpenAI(base_url=http, api_key="unused", max_retries=0, timeout=60) as client,
                pytest.raises(openai.AuthenticationError),
            ):
                client.models.list()
            # The router port is mTLS: a plaintext probe gets nowhere, the admin certificate in.
            assert run_to_exit(["probe", f"127.0.0.1:{base + 2}"]).stdout.strip() == "UNREACHABLE"
            tls = state / "tls"
            admin = {
                "TOKENYARD_TLS_CA": str(tls / "ca.crt"),
                "TOKENYARD_TLS_CERT": str(tls / "admin.crt"),
                "TOKENYARD_TLS_KEY": str(tls / "admin.key"),
            }
            assert run_to_exit(["probe", f"127.0.0.1:{base + 2}"], env=admin).stdout.strip() == "SERVING"
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(60)
    assert code == 0, (tmp_path / "up.log").read_text()
    assert not (state / "tls").exists()


# ---- tools: the profiler -----------------------------------------------------------------------


def test_the_profiler_sweeps_a_worker_over_mtls(deployment: Deployment, tmp_path: Path) -> None:
    """`tokenyard profile --worker` dials with the deployment's TLS, as every other client does."""
    out = tmp_path / "profile.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
    sweep = [
        "--prefill-isl", "16,32", "--decode-context", "64,128", "--decode-kv-points", "2",
        "--decode-osl", "4", "--repeats", "1", "--request-timeout", "60",
    ]  # fmt: skip
    argv = [sys.executable, "-m", "tokenyard.cli", "profile", "--worker", deployment.workers[0].address]
    done = subprocess.run(
        [*argv, *sweep, "--output", str(out), *_tls_flags(deployment.certs, "admin")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    # Every cell was measured over mTLS. (This fixture's mocker answers instantly, so the decode
    # times are 0 ms, which a profile refuses to hold: whether the file is written is not the point.)
    said = done.stdout + done.stderr
    assert "prefill isl     32" in said and "decode kv     256 ctx   128" in said, said
    assert "UNAVAILABLE" not in said and "UNAUTHENTICATED" not in said, said
