"""``tokenyard up``: a whole deployment as processes on one host, with directory discovery.

Starts the router, planner, gms and N workers, waits until each reports SERVING, then starts the
frontend. ``--prefill-workers N --decode-workers M`` starts a split deployment instead: N prefill
and M decode workers (``--role prefill|decode``), whose requests the frontend disaggregates.
Child output is prefixed with its name. Ctrl-C or SIGTERM stops everything: SIGTERM to
each child (frontend first, so no new requests arrive while workers drain), SIGKILL for any that
outlive the grace period. A child that dies on its own is restarted, after a delay that doubles
with each recent restart (:mod:`tokenyard.deploy.supervisor`); one that keeps dying (more than
``--max-restarts`` restarts within ``--restart-window`` seconds) is given up on: the deployment
stops, says which child and why, and exits non-zero.

The deployment's state (its pid file, the gms socket, logs of --detach) lives in the user's
runtime folder (:mod:`tokenyard.deploy.state`), so ``tokenyard down`` works from any folder, and
a stop leaves no pid file or socket behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from tokenyard.common.cli_settings import parse_settings
from tokenyard.common.settings import default_discovery_url, settings_config
from tokenyard.common.tls import PLAINTEXT
from tokenyard.deploy import parent_watch, state
from tokenyard.deploy.certs import throwaway_tls
from tokenyard.deploy.status import service_health
from tokenyard.deploy.supervisor import RestartPolicy, RestartTracker, describe_exit


class UpSettings(BaseSettings):
    model_config = settings_config("up")
    service_name: ClassVar[str] = "up"

    engine: Literal["mocker", "cpu", "vllm"] = Field(
        default="cpu",
        description="Worker engine: cpu runs SmolLM2-135M-Instruct for real; vllm runs it with vLLM (from "
        ".venv-vllm, which make test-vllm installs); mocker simulates one.",
    )
    workers: int = Field(default=2, ge=1, le=64, description="Number of workers.")
    model: str = Field(default="SmolLM2-135M-Instruct", description="Model the workers serve.")
    host: str = Field(default="127.0.0.1", description="Loopback address every process binds to.")
    discovery: str = Field(
        default_factory=default_discovery_url, description="Discovery backend shared by all."
    )
    http_port: int = Field(default=8000, ge=1, le=65535, description="Frontend OpenAI HTTP port.")
    grpc_port: int = Field(default=8001, ge=1, le=65535, description="Frontend KServe gRPC port.")
    router_port: int = Field(default=8100, ge=1, le=65535, description="Router gRPC port (/metrics on +1).")
    planner_port: int = Field(default=8200, ge=1, le=65535, description="Planner gRPC port (/metrics on +1).")
    gms_metrics_port: int = Field(default=8401, ge=1, le=65535, description="gms /metrics port.")
    worker_port: int = Field(default=8300, ge=1, le=65535, description="First worker gRPC port (+1 each).")
    worker_metrics_port: int = Field(default=9300, ge=1, le=65535, description="First worker /metrics port.")
    ready_timeout: float = Field(
        default=300.0, gt=0, description="Seconds to wait for every service to be ready."
    )
    grace_period: float = Field(default=10.0, ge=0, description="Seconds children get to stop on shutdown.")
    state_dir: str = Field(
        default_factory=state.default_state_dir,
        description="Folder for the pid file, the gms socket and the logs of --detach: "
        "$TOKENYARD_HOME/state, else $XDG_RUNTIME_DIR/tokenyard, else ~/.local/state/tokenyard.",
    )
    max_restarts: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Restarts of one child within --restart-window seconds after which the deployment "
        "gives up on it and stops (0: a child that dies stops the deployment).",
    )
    restart_window: float = Field(
        default=120.0, gt=0, description="Seconds over which --max-restarts counts a child's restarts."
    )
    detach: bool = Field(default=False, description="Run in the background; stop it with `tokenyard down`.")
    tls: bool = Field(
        default=False,
        description="mTLS between the services, with a throwaway CA made at start in <state-dir>/tls "
        "(admin.crt/.key there for `tokenyard status`), removed at stop.",
    )
    log_level: str = Field(default="info", description="Log level of every child.")
    cpu_threads: int = Field(
        default=0,
        ge=0,
        description="Compute threads per cpu worker; 0 splits this machine's cores between the workers.",
    )
    router_mode: str = Field(
        default="", description="Routing mode passed to the router; empty keeps its default."
    )
    gms: bool = Field(
        default=False,
        description="cpu workers take their weights from the gms (--cpu-gms): the first loads and "
        "publishes them, the others (and every restart) map the same copy.",
    )
    prefill_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Prefill workers (--role prefill) of a split deployment; needs --decode-workers. "
        "Split workers replace the --workers aggregated ones.",
    )
    decode_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Decode workers (--role decode) of a split deployment; with --prefill-workers the "
        "frontend disaggregates requests, alone they serve like aggregated workers.",
    )

    @model_validator(mode="after")
    def _one_topology(self) -> UpSettings:
        if self.prefill_workers and not self.decode_workers:
            raise ValueError(
                "--prefill-workers needs --decode-workers: prefill workers serve no client alone"
            )
        if (self.prefill_workers or self.decode_workers) and "workers" in self.model_fields_set:
            raise ValueError(
                "--workers (aggregated workers) and --prefill-workers / --decode-workers (a split "
                "deployment) exclude each other"
            )
        return self

    def worker_roles(self) -> list[tuple[str, str]]:
        """(name, role) of every worker, in start order."""
        if not (self.prefill_workers or self.decode_workers):
            return [(f"worker-{i}", "aggregated") for i in range(self.workers)]
        return [(f"prefill-{i}", "prefill") for i in range(self.prefill_workers)] + [
            (f"decode-{i}", "decode") for i in range(self.decode_workers)
        ]

    def describe_workers(self) -> str:
        if not (self.prefill_workers or self.decode_workers):
            return str(self.workers)
        return f"{self.prefill_workers} prefill + {self.decode_workers} decode"


ANNOUNCEMENT = """
tokenyard is up: {workers} {engine} worker(s) serving {model!r}
  OpenAI HTTP   http://{host}:{http}/v1   (/health, /metrics)
  KServe gRPC   {host}:{grpc}
  router        {host}:{router}   planner {host}:{planner}
  discovery     {discovery}

try it:
{key_setup}  curl -s http://{host}:{http}/v1/chat/completions -H 'content-type: application/json' \\{curl_auth}
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

{python} - <<'EOF'
import {py_os}openai
client = openai.OpenAI(base_url="http://{host}:{http}/v1", api_key={openai_key})
reply = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "What is the capital of France?"}}])
print(reply.choices[0].message.content)
EOF

{python} - <<'EOF'
import {py_os}numpy as np, tritonclient.grpc as triton
client = triton.InferenceServerClient("{host}:{grpc}")
prompt = triton.InferInput("text_input", [1], "BYTES")
prompt.set_data_from_numpy(np.array([b"The capital of France is"], dtype=object))
print(client.infer("{model}", [prompt]{triton_auth}).as_numpy("text_output"))
EOF

  {tokenyard} status
  {tokenyard} down       (from any folder; state in {state_dir})

A child that dies is restarted. Ctrl-C stops everything.
"""


# Where the frontend (which inherits this process's environment) finds its API keys, most
# specific first, as its settings read them.
_KEY_FILE_ENV = "TOKENYARD_FRONTEND_API_KEYS_FILE"
_KEYS_ENVS = ("TOKENYARD_FRONTEND_API_KEYS", "TOKENYARD_API_KEYS")


def key_examples(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parts of the call examples that send an API key, when the frontend has one.

    The examples name where the key comes from (a variable, the keys file) and never print the
    key itself: the announcement ends up in terminals and logs.
    """
    env = os.environ if environ is None else environ
    setup = ""
    key_file = env.get(_KEY_FILE_ENV, "")
    if key_file:
        # The file's first key; the file format skips blank lines and # comments.
        setup = (
            f"  # API keys are on (${_KEY_FILE_ENV}): the examples send the file's first key\n"
            f"  export KEY=\"$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "
            f"{shlex.quote(key_file)} | head -n 1 | tr -d '[:space:]')\"\n\n"
        )
    else:
        for name in _KEYS_ENVS:
            if env.get(name, "").strip():
                setup = (
                    f"  # API keys are on (${name}): the examples send its first key\n"
                    f'  export KEY="$(printf %s "${name}" | cut -d, -f1 | tr -d \'[:space:]\')"\n\n'
                )
                break
    if not setup:
        return {"key_setup": "", "curl_auth": "", "py_os": "", "openai_key": '"unused"', "triton_auth": ""}
    return {
        "key_setup": setup,
        "py_os": "os, ",
        "curl_auth": '\n    -H "Authorization: Bearer $KEY" \\',
        "openai_key": 'os.environ["KEY"]',
        "triton_auth": ', headers={"authorization": "Bearer " + os.environ["KEY"]}',
    }


@dataclass
class Child:
    name: str
    argv: list[str]
    health_address: str
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None
    tail: list[str] = field(default_factory=list)
    restarts: RestartTracker = field(default_factory=lambda: RestartTracker(RestartPolicy()))


# Seconds the output of a child that exited gets to drain before its pump is cancelled.
PUMP_DRAIN_S = 2.0
# How often a child's exit is checked while its output pipe may still be held open.
EXIT_POLL_S = 0.2

# Seconds an engine needs to stop beyond the grace period: vLLM's engine core waits 5 s for its
# model-runner process, then tears down for several more (13 s measured on two idle cores).
ENGINE_STOP_S = {"vllm": 30.0}


def vllm_core_sets(workers: int) -> list[str]:
    """Each vLLM worker's compute cores (``--vllm-omp-threads-bind``); none: vLLM's own choice.

    vLLM pins its compute threads. Left to itself, every worker on one machine pins the same cores
    (all but one, kept for its scheduler) and they fight over them; so several workers get a slice
    each, and with more workers than cores nobody pins.
    """
    if workers == 1:
        return []
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        return ["nobind"] * workers
    per = len(cores) // workers
    return [",".join(str(c) for c in cores[i * per : (i + 1) * per]) for i in range(workers)]


def planner_predictor_flags() -> list[str]:
    """The planner's default predictor (ARIMA) needs the ``planner`` extra; without it the
    deployment's planner predicts with the Kalman filter instead of failing to start."""
    if importlib.util.find_spec("statsmodels") is not None:
        return []
    print(
        "statsmodels is not installed (pip install 'tokenyard[planner]'): the planner predicts with kalman",
        file=sys.stderr,
    )
    return ["--throughput-predictor", "kalman"]


def plan(s: UpSettings) -> list[Child]:
    """Every process of the deployment, in start order (the frontend last)."""
    base = [sys.executable, "-m", "tokenyard.cli"]
    common = ["--host", s.host, "--discovery", s.discovery, "--log-level", s.log_level]
    engine_flags: list[str] = []
    if s.engine == "cpu":
        # Workers sharing a machine must not each claim every core: torch threads then fight.
        threads = s.cpu_threads or max(1, (os.cpu_count() or 1) // len(s.worker_roles()))
        engine_flags = ["--cpu-num-threads", str(threads)]
    core_sets = vllm_core_sets(len(s.worker_roles())) if s.engine == "vllm" else []
    router_flags = ["--mode", s.router_mode] if s.router_mode else []
    state_dir = Path(s.state_dir).expanduser().resolve()
    gms_socket = str(state_dir / "gms-0.sock")
    if s.gms and s.engine == "cpu":
        # From a template (--respawn): a crashed worker maps the weights again in a fraction of a
        # second, without importing PyTorch again; up restarts the template only if it dies too.
        engine_flags += ["--cpu-gms", "--cpu-gms-socket", gms_socket, "--respawn"]
    children = [
        Child(
            "router",
            [
                *base,
                "router",
                *common,
                "--port",
                str(s.router_port),
                "--metrics-port",
                str(s.router_port + 1),
                *router_flags,
            ],
            f"{s.host}:{s.router_port}",
        ),
        Child(
            "planner",
            [
                *base,
                "planner",
                *common,
                "--port",
                str(s.planner_port),
                "--metrics-port",
                str(s.planner_port + 1),
                # What its local connector (TOKENYARD_PLANNER_CONNECTOR=local) needs to start more
                # workers like these: the same engine and model, ports past the 64 `up` may use.
                "--local-engine",
                s.engine,
                "--local-model",
                s.model,
                "--local-first-port",
                str(s.worker_port + 64),
                "--local-first-metrics-port",
                str(s.worker_metrics_port + 64),
                "--local-state-dir",
                str(state_dir / "planner-workers"),
                "--local-worker-args",
                shlex.join(engine_flags),
                *planner_predictor_flags(),
            ],
            f"{s.host}:{s.planner_port}",
        ),
        Child(
            "gms",
            [*base, "gms", *common, "--socket", gms_socket, "--metrics-port", str(s.gms_metrics_port)],
            f"unix://{gms_socket}",
        ),
    ]
    for i, (name, role) in enumerate(s.worker_roles()):
        port = s.worker_port + i
        role_flags = [] if role == "aggregated" else ["--role", role]
        children.append(
            Child(
                name,
                [
                    *base,
                    "worker",
                    *common,
                    "--engine",
                    s.engine,
                    "--model",
                    s.model,
                    "--port",
                    str(port),
                    "--metrics-port",
                    str(s.worker_metrics_port + i),
                    *role_flags,
                    *engine_flags,
                    *(["--vllm-omp-threads-bind", core_sets[i]] if core_sets else []),
                ],
                f"{s.host}:{port}",
            )
        )
    children.append(
        Child(
            "frontend",
            [
                *base,
                "frontend",
                *common,
                "--port",
                str(s.grpc_port),
                "--http-port",
                str(s.http_port),
                "--router",
                f"{s.host}:{s.router_port}",
            ],
            f"{s.host}:{s.grpc_port}",
        )
    )
    return children


class Deployment:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir).expanduser().resolve()
        self.children = plan(settings)
        self.tls = PLAINTEXT
        policy = RestartPolicy(max_restarts=settings.max_restarts, window=settings.restart_window)
        for child in self.children:
            child.restarts = RestartTracker(policy)
        self.width = max(len(c.name) for c in self.children)
        self.stopping = asyncio.Event()
        self.failed: str | None = None

    async def _pump(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        prefix = f"{child.name:<{self.width}} | "
        async for raw in child.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            child.tail = [*child.tail[-19:], line]
            sys.stdout.write(prefix + line + "\n")
            sys.stdout.flush()

    async def spawn(self, child: Child) -> None:
        child.proc = await asyncio.create_subprocess_exec(
            *child.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Own session: Ctrl-C reaches only this supervisor, which stops children in order.
            start_new_session=True,
            # ... and should the supervisor be killed outright, each child stops by itself.
            env=parent_watch.child_env(),
        )
        child.pump = asyncio.create_task(self._pump(child))

    async def wait_ready(self, children: Sequence[Child]) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout
        pending = list(children)
        while pending:
            for child in list(pending):
                assert child.proc is not None
                if child.proc.returncode is not None:
                    raise RuntimeError(
                        f"{child.name} exited with code {child.proc.returncode} while starting"
                    )
                # argv: python -m tokenyard.cli SERVICE ...
                if await service_health(child.health_address, child.argv[3], 1.0, self.tls) == "SERVING":
                    pending.remove(child)
            if self.stopping.is_set():
                raise RuntimeError("interrupted while starting")
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise RuntimeError(f"not ready after {self.settings.ready_timeout:.0f}s: {names}")
            if pending:
                await asyncio.sleep(0.2)

    def _say(self, text: str) -> None:
        sys.stdout.write(f"{'up':<{self.width}} | {text}\n")
        sys.stdout.flush()

    async def _exited(self, child: Child) -> None:
        """Until ``child``'s process has exited.

        Not ``proc.wait()`` alone: it also waits for the child's pipes to close, and a process the
        child started can hold its stdout open long after the child died (see :meth:`_reap`).
        """
        proc = child.proc
        assert proc is not None
        waiter = asyncio.ensure_future(proc.wait())
        try:
            while proc.returncode is None and not waiter.done():
                await asyncio.wait({waiter}, timeout=EXIT_POLL_S)
        finally:
            waiter.cancel()

    async def _reap(self, child: Child) -> None:
        """After ``child`` exited: stop what it left running and collect its last lines.

        A grandchild (an engine's helper process) can outlive it, holding its ports and the write
        end of its stdout: the pump would never see EOF and the child would never be restarted.
        The child has its own session, hence its own process group: what is left in that group is
        killed, and the pump gets a short while for the lines still buffered, then is cancelled.
        """
        assert child.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        pump = child.pump
        if pump is None:
            return
        # asyncio.wait neither raises the pump's outcome nor cancels it on timeout.
        await asyncio.wait({pump}, timeout=PUMP_DRAIN_S)
        if not pump.done():
            # Something outside the group still holds the pipe: give up on its last lines.
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def keep(self, child: Child) -> None:
        """Restart ``child`` each time it exits on its own, until stopping or giving up."""
        while not self.stopping.is_set():
            assert child.proc is not None
            await self._exited(child)
            if self.stopping.is_set():
                return
            # Its last lines, for the message below.
            await self._reap(child)
            how = describe_exit(child.proc.returncode)
            delay = child.restarts.next_delay()
            if delay is None:
                p = child.restarts.policy
                last = "\n".join(child.tail[-10:])
                self.failed = (
                    f"{child.name} {how}, after {child.restarts.recent} restart(s) within {p.window:.0f}s "
                    f"(--max-restarts {p.max_restarts} / --restart-window); giving up on it"
                    + (f"\n--- last lines of {child.name} ---\n{last}" if last else "")
                )
                self.stopping.set()
                return
            self._say(
                f"{child.name} {how}; restarting it in {delay:.1f}s "
                f"(restart {child.restarts.recent} of at most {child.restarts.policy.max_restarts} "
                f"within {child.restarts.policy.window:.0f}s)"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return
            try:
                await self.spawn(child)
            except OSError as exc:
                self.failed = f"{child.name} could not be restarted: {exc}"
                self.stopping.set()
                return

    async def supervise(self) -> None:
        """Keep every child running until stopping is set (Ctrl-C, SIGTERM, or a child given up)."""
        keepers = [asyncio.create_task(self.keep(c), name=f"keep-{c.name}") for c in self.children]
        try:
            await self.stopping.wait()
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)

    async def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = (
            time.monotonic() + self.settings.grace_period + 5 + ENGINE_STOP_S.get(self.settings.engine, 0.0)
        )
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                await asyncio.wait_for(self._exited(child), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                print(f"{child.name} did not stop in time; killing it", file=sys.stderr)
                # Its whole process group (its own session): helpers it started go with it.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                await self._exited(child)
            await self._reap(child)

    async def run(self) -> int:
        other = state.running_pid(self.state_dir)
        if other is not None and other != os.getpid():
            print(
                f"tokenyard up: error: a deployment is already running from {self.state_dir} (pid {other}); "
                "stop it with `tokenyard down`, or use another --state-dir",
                file=sys.stderr,
            )
            return 1
        state.prepare(self.state_dir)
        state.remove_stale(self.state_dir)
        (self.state_dir / state.PID_FILE).write_text(f"{os.getpid()}\n")
        try:
            tls = (
                throwaway_tls(self.state_dir / "tls")
                if self.settings.tls
                else contextlib.nullcontext(PLAINTEXT)
            )
            with tls as self.tls:
                return await self._run()
        finally:
            state.remove_stale(self.state_dir)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            backends = self.children[:-1]
            for child in backends:
                await self.spawn(child)
            await self.wait_ready(backends)
            await self.spawn(self.children[-1])
            await self.wait_ready(self.children[-1:])
        except RuntimeError as exc:
            print(f"tokenyard up: error: {exc}", file=sys.stderr)
            for child in self.children:
                if child.proc is not None and child.proc.returncode not in (None, 0) and child.tail:
                    print(
                        f"--- last lines of {child.name} ---\n" + "\n".join(child.tail[-10:]), file=sys.stderr
                    )
            await self.stop()
            return 1
        self._announce()
        await self.supervise()
        print("stopping the deployment ...", flush=True)
        await self.stop()
        if self.failed:
            print(f"tokenyard up: error: {self.failed}; the deployment was stopped", file=sys.stderr)
            return 1
        print("stopped", flush=True)
        return 0

    def _announce(self) -> None:
        s = self.settings
        ready = self.state_dir / state.READY_FILE
        ready.write_text(str(os.getpid()))
        # Absolute paths: the examples work without activating the virtualenv.
        python = Path(sys.executable)
        text = ANNOUNCEMENT.format(
            python=shlex.quote(str(python)),
            tokenyard=shlex.quote(str(python.parent / "tokenyard")),
            state_dir=self.state_dir,
            workers=s.describe_workers(),
            engine=s.engine,
            model=s.model,
            host=s.host,
            http=s.http_port,
            grpc=s.grpc_port,
            router=s.router_port,
            planner=s.planner_port,
            discovery=s.discovery,
            **key_examples(),
        )
        print(text, flush=True)


def _detach(s: UpSettings, argv: Sequence[str]) -> int:
    state_dir = state.prepare(Path(s.state_dir))
    other = state.running_pid(state_dir)
    if other is not None:
        print(
            f"tokenyard up: error: a deployment is already running from {state_dir} (pid {other}); "
            "stop it with `tokenyard down`",
            file=sys.stderr,
        )
        return 1
    state.remove_stale(state_dir)
    log_path = state_dir / state.LOG_FILE
    args = [a for a in argv if a not in ("--detach",)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            # The same state folder whatever the child's environment says.
            [
                sys.executable,
                "-m",
                "tokenyard.cli",
                "up",
                *args,
                "--no-detach",
                "--state-dir",
                str(state_dir),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (state_dir / state.PID_FILE).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + s.ready_timeout + 10
    while time.monotonic() < deadline:
        if (state_dir / state.READY_FILE).exists():
            print(
                f"tokenyard is up in the background (pid {proc.pid}); logs: {log_path}; "
                "stop: tokenyard down (from any folder)"
            )
            return 0
        if proc.poll() is not None:
            print(
                f"tokenyard up: error: the deployment exited with code {proc.returncode}; see {log_path}",
                file=sys.stderr,
            )
            state.remove_stale(state_dir)
            return 1
        time.sleep(0.3)
    print(f"tokenyard up: error: not ready in time; see {log_path}", file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    settings, _ = parse_settings(UpSettings, argv, "tokenyard up", __doc__ or "")
    if settings.detach:
        return _detach(settings, argv)
    return asyncio.run(Deployment(settings).run())


def main_down(argv: Sequence[str]) -> int:
    settings, _ = parse_settings(
        UpSettings,
        argv,
        "tokenyard down",
        "Stop the local deployment (started with `tokenyard up`, detached or not).",
    )
    state_dir = Path(settings.state_dir).expanduser().resolve()
    pid = state.running_pid(state_dir)
    if pid is None:
        stale = state.remove_stale(state_dir) if state_dir.is_dir() else []
        note = f"; removed {len(stale)} stale file(s)" if stale else ""
        print(f"tokenyard down: nothing to stop (no deployment running from {state_dir}){note}")
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state.remove_stale(state_dir)
        print("tokenyard down: the deployment was not running")
        return 0
    deadline = time.monotonic() + settings.grace_period + 15 + ENGINE_STOP_S.get(settings.engine, 0.0)
    while time.monotonic() < deadline:
        if state.running_pid(state_dir) != pid:
            state.remove_stale(state_dir)
            print("stopped")
            return 0
        time.sleep(0.2)
    print(f"tokenyard down: error: pid {pid} still running", file=sys.stderr)
    return 1
