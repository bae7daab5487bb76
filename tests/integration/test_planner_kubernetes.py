"""The kubernetes connector against a local HTTP server that speaks the Deployment scale
subresource (and Deployment status), and against the repository's manifests."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tokenyard.planner.connectors import ConnectorError
from tokenyard.planner.connectors.kubernetes import (
    DEFAULT_DEPLOYMENTS,
    KubernetesConnector,
    KubernetesOptions,
)
from tokenyard.planner.pools import Pool

pytestmark = pytest.mark.integration

NS = "tokenyard"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class FakeDeployment:
    replicas: int
    ready: int
    version: int = 1


@dataclass
class FakeApi:
    deployments: dict[str, FakeDeployment]
    requests: list[tuple[str, str, str, Any]] = field(default_factory=list)
    conflicts: int = 0
    """Answer this many PATCHes with 409 (another writer got there first)."""
    status: int = 0
    """Answer every request with this HTTP status (0: behave)."""
    delay_s: float = 0.0
    ready_follows: bool = True
    """Pods become ready as soon as replicas change."""

    def scale_doc(self, name: str) -> dict[str, Any]:
        d = self.deployments[name]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": str(d.version)},
            "spec": {"replicas": d.replicas},
            "status": {"replicas": d.replicas, "selector": f"app={name}"},
        }

    def deployment_doc(self, name: str) -> dict[str, Any]:
        d = self.deployments[name]
        return {
            "kind": "Deployment",
            "apiVersion": "apps/v1",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": str(d.version)},
            "spec": {
                "replicas": d.replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}},
            },
            "status": {"replicas": d.replicas, "readyReplicas": d.ready},
        }

    @staticmethod
    def error(status: int, reason: str, message: str) -> web.Response:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": status,
        }
        return web.json_response(body, status=status)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body: Any = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, request.headers.get("Content-Type", ""), body))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status:
            return self.error(self.status, "Forbidden" if self.status == 403 else "InternalError", "nope")
        name = request.match_info["name"]
        if request.match_info["ns"] != NS or name not in self.deployments:
            return self.error(404, "NotFound", f'deployments.apps "{name}" not found')
        d = self.deployments[name]
        if request.path.endswith("/scale"):
            if request.method == "GET":
                return web.json_response(self.scale_doc(name))
            if request.headers.get("Content-Type") != "application/merge-patch+json":
                return self.error(415, "UnsupportedMediaType", "the body is not a merge patch")
            if self.conflicts:
                self.conflicts -= 1
                d.version += 1  # someone else wrote meanwhile
            if body["metadata"]["resourceVersion"] != str(d.version):
                return self.error(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes "
                    "to the latest version and try again",
                )
            d.replicas = int(body["spec"]["replicas"])
            d.version += 1
            if self.ready_follows:
                d.ready = d.replicas
            return web.json_response(self.scale_doc(name))
        return web.json_response(self.deployment_doc(name))


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApi, str]]:
    fake = FakeApi(
        {
            "tokenyard-worker-prefill": FakeDeployment(1, 1),
            "tokenyard-worker-decode": FakeDeployment(2, 2),
        }
    )
    app = web.Application()
    app.router.add_route("*", "/apis/apps/v1/namespaces/{ns}/deployments/{name}", fake.handle)
    app.router.add_route("*", "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def connector(url: str, **kw: Any) -> KubernetesConnector:
    options = KubernetesOptions(api_server=url, namespace=NS, poll_interval_s=0.02, ready_timeout_s=2, **kw)
    return KubernetesConnector(options, (Pool.PREFILL, Pool.DECODE))


async def test_scale_patches_the_scale_subresource(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    k = connector(url)
    assert await k.current_replicas() == {Pool.PREFILL: 1, Pool.DECODE: 2}
    await k.scale({Pool.PREFILL: 3, Pool.DECODE: 2}, decision_id=7)
    patches = [r for r in fake.requests if r[0] == "PATCH"]
    assert len(patches) == 1  # decode was already at 2
    _, path, content_type, body = patches[0]
    assert path == f"/apis/apps/v1/namespaces/{NS}/deployments/tokenyard-worker-prefill/scale"
    assert content_type == "application/merge-patch+json"
    assert body == {"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 3}}
    assert await k.current_replicas() == {Pool.PREFILL: 3, Pool.DECODE: 2}
    await k.close()


async def test_a_conflict_is_read_again_and_retried(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.conflicts = 2
    k = connector(url)
    await k.scale({Pool.PREFILL: 4, Pool.DECODE: 2}, 1)
    patches = [r for r in fake.requests if r[0] == "PATCH"]
    assert [p[3]["metadata"]["resourceVersion"] for p in patches] == ["1", "2", "3"]
    assert fake.deployments["tokenyard-worker-prefill"].replicas == 4


async def test_conflicts_that_keep_winning_fail_clearly(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.conflicts = 10
    with pytest.raises(
        ConnectorError, match=r"scaling Deployment tokenyard/tokenyard-worker-prefill .* conflicting"
    ):
        await connector(url, conflict_retries=2).scale({Pool.PREFILL: 4, Pool.DECODE: 2}, 1)


async def test_a_missing_deployment(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    del fake.deployments["tokenyard-worker-decode"]
    k = connector(url)
    with pytest.raises(ConnectorError, match=r"tokenyard/tokenyard-worker-decode \(decode pool\): not found"):
        await k.current_replicas()


@pytest.mark.parametrize(
    ("status", "message"), [(403, "not allowed .* deployments/scale"), (500, "HTTP 500")]
)
async def test_api_errors(api: tuple[FakeApi, str], status: int, message: str) -> None:
    fake, url = api
    fake.status = status
    with pytest.raises(ConnectorError, match=message):
        await connector(url).scale({Pool.PREFILL: 2, Pool.DECODE: 2}, 1)


async def test_a_slow_api_server_times_out(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.delay_s = 1.0
    with pytest.raises(ConnectorError, match=r"did not answer in time|cannot reach"):
        await connector(url, request_timeout_s=0.2).current_replicas()


async def test_an_unreachable_api_server() -> None:
    with pytest.raises(ConnectorError, match="cannot reach the API server"):
        await connector("http://127.0.0.1:9").current_replicas()


async def test_replicas_that_never_become_ready(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.ready_follows = False
    with pytest.raises(ConnectorError, match=r"1 of 3 replicas ready \(3 pods\)"):
        await connector(url).scale({Pool.PREFILL: 3, Pool.DECODE: 2}, 1)


def _manifests() -> list[dict[str, Any]]:
    overlay = ROOT / "deploy" / "k8s" / "overlays" / "disagg"
    kubectl = shutil.which("kubectl")
    if not overlay.is_dir() or kubectl is None:
        pytest.skip("no deploy/k8s manifests or no kubectl to render them")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    if rendered.returncode != 0:
        pytest.skip(f"kubectl kustomize failed: {rendered.stderr.strip()[:200]}")
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


def test_the_manifests_name_the_deployments_and_grant_the_scale_subresource() -> None:
    docs = _manifests()
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert (
        DEFAULT_DEPLOYMENTS[Pool.PREFILL] in deployments and DEFAULT_DEPLOYMENTS[Pool.DECODE] in deployments
    )
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "tokenyard-planner"]
    rules = [(set(r["resources"]), set(r["verbs"])) for r in role["rules"]]
    assert any("deployments/scale" in res and {"get", "patch"} <= verbs for res, verbs in rules)
    assert any("deployments" in res and "get" in verbs for res, verbs in rules)
    planner = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "tokenyard-planner"
    )
    assert planner["spec"]["template"]["spec"]["serviceAccountName"] == "tokenyard-planner"
    print(json.dumps(sorted(deployments)))
