"""Static checks of the Grafana dashboards and of compose's observability profile.

The dashboards' queries run against a real Prometheus in tests/e2e/test_dashboards.py (slow);
here, fast: the JSON is well formed, every panel queries the dashboard's data source variable,
and every metric a query names is one the services declare (their metrics classes, instantiated
on a private registry), so a renamed metric fails `make test`, not only `make test-all`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tokenyard.common.metrics import Metrics
from tokenyard.frontend.metrics import FrontendMetrics
from tokenyard.planner.metrics import PlannerMetrics
from tokenyard.router.metrics import RouterMetrics
from tokenyard.worker.metrics import WorkerMetrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
COMPOSE = ROOT / "compose.yaml"
PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"
# What the issue asks the dashboards to show, as metric families that must appear in some query.
REQUIRED = {
    "request rate": "tokenyard_frontend_requests_total",
    "errors": "tokenyard_frontend_model_rejection_total",
    "TTFT": "tokenyard_frontend_time_to_first_token_seconds_bucket",
    "ITL": "tokenyard_frontend_inter_token_latency_seconds_bucket",
    "KV hit rate": "tokenyard_frontend_kv_hit_rate_sum",
    "router decisions": "tokenyard_router_decisions_total",
    "load per worker": "tokenyard_router_worker_active_requests",
    "KV events": "tokenyard_router_kv_events_applied_total",
    "worker queue": "tokenyard_worker_waiting_requests",
    "cache usage": "tokenyard_worker_kv_blocks_active",
    "planner decisions": "tokenyard_planner_replicas",
    "planner targets": "tokenyard_planner_target_latency_ms",
    "migrations": "tokenyard_frontend_model_migration_total",
    "disaggregation": "tokenyard_frontend_disagg_decisions_total",
}


def load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc["panels"] if p["type"] != "row"]


def exposed_names() -> set[str]:
    """Every sample name the services can expose (counters with _total, histogram series)."""
    registry = CollectorRegistry()
    FrontendMetrics(registry)
    RouterMetrics(registry)
    PlannerMetrics(registry)
    worker = Metrics("worker")
    WorkerMetrics(worker)
    names: set[str] = set()
    for reg in (registry, worker.registry):
        for family in reg.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            names.add(family.name)
    return names


def test_there_are_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == ["tokenyard-overview.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path) -> None:
    doc = load(path)
    assert doc["uid"] and len(doc["uid"]) <= 40
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    cells: set[tuple[int, int]] = set()
    for panel in doc["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        covered = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & covered, f"{panel['title']} overlaps another panel"
        cells |= covered
    for panel in panels(doc):
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_queried_metric_is_one_the_services_declare(path: Path) -> None:
    known = exposed_names()
    for panel in panels(load(path)):
        for target in panel["targets"]:
            for name in re.findall(r"\btokenyard_\w+", target["expr"]):
                assert name in known, f"{panel['title']}: {name} is declared by no service"


def test_the_dashboards_show_what_operators_look_for() -> None:
    queried = {
        name
        for path in DASHBOARDS
        for panel in panels(load(path))
        for target in panel["targets"]
        for name in re.findall(r"\btokenyard_\w+", target["expr"])
    }
    missing = {what: name for what, name in REQUIRED.items() if name not in queried}
    assert not missing, missing


# --- compose: the observability profile ---------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    assert isinstance(services, dict)
    return services


def test_profiles_split_the_deployment_as_documented() -> None:
    services = compose_services()
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    # `certs` is the one-shot job that issues the services' mTLS certificates before they start.
    assert default == {"certs", "redis", "router", "frontend", "planner", "gms", "worker"}
    assert services["worker"]["environment"]["TOKENYARD_WORKER_ENGINE"] == "mocker"
    by_profile: dict[str, set[str]] = {}
    for name, svc in services.items():
        for profile in svc.get("profiles", []):
            by_profile.setdefault(profile, set()).add(name)
    assert by_profile["cpu"] == {"worker-cpu"}
    assert by_profile["vllm"] == {"worker-vllm"}
    assert {"worker-prefill", "worker-decode"} <= by_profile["disagg"]
    assert by_profile["observability"] == {"prometheus", "grafana", "otel-collector", "jaeger"}
    assert services["worker-vllm"]["environment"]["TOKENYARD_WORKER_ENGINE"] == "vllm"
    assert services["worker-vllm"]["build"]["target"] == "worker-vllm"


def test_every_tokenyard_service_logs_json_and_waits_for_the_collector_only_when_it_runs() -> None:
    for name, svc in compose_services().items():
        if "build" not in svc:
            continue
        env = svc["environment"]
        log_formats = [v for k, v in env.items() if k.startswith("TOKENYARD_") and k.endswith("_LOG_FORMAT")]
        assert log_formats == ["json"], name
        assert env["OTEL_SERVICE_NAME"].startswith("tokenyard-"), name
        # Interpolated: empty (tracing off) unless OTLP_ENDPOINT is set.
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTLP_ENDPOINT:-}", name
        collector = svc["depends_on"]["otel-collector"]
        assert collector == {"condition": "service_started", "required": False}, name


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards() -> None:
    grafana = compose_services()["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./deploy/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.removeprefix("/var/lib/grafana/dashboards/") in {p.name for p in DASHBOARDS}
    (datasources,) = (PROVISIONING / "datasources").glob("*.yaml")
    sources = {d["type"]: d for d in yaml.safe_load(datasources.read_text(encoding="utf-8"))["datasources"]}
    assert sources["prometheus"]["url"] == "http://prometheus:9090" and sources["prometheus"]["isDefault"]
    assert sources["jaeger"]["url"] == "http://jaeger:16686"
    (providers,) = (PROVISIONING / "dashboards").glob("*.yaml")
    (provider,) = yaml.safe_load(providers.read_text(encoding="utf-8"))["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert all(p.startswith("127.0.0.1:") for p in grafana["ports"])


def test_the_collector_exports_traces_to_the_trace_store() -> None:
    services = compose_services()
    collector = services["otel-collector"]
    (mount,) = collector["volumes"]
    config = yaml.safe_load((ROOT / mount.split(":")[0]).read_text(encoding="utf-8"))
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    exporters = config["service"]["pipelines"]["traces"]["exporters"]
    store = [config["exporters"][e] for e in exporters if e.startswith("otlp")]
    assert [s["endpoint"] for s in store] == ["jaeger:4317"]
    assert "4317" in services["jaeger"]["expose"]
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
