"""The memory service (gms) with real CPU workers (SmolLM2-135M-Instruct), against the same
workers without it, measured in the same run.

* Restart: a worker process started again, from process start to health SERVING and to its first
  token, loading its weights from disk (the page cache is warm: it is a restart on the same host)
  or mapping them from the gms that a previous worker filled. Rounds alternate between the two.
  The engine's startup line splits it: when the engine began (the interpreter, imports and
  settings before it), the weights, the KV pools, when it was ready; SERVING minus ready is the
  server and discovery. Goal: with the gms at least 5x faster to SERVING.
* Respawn: a worker run with ``--respawn`` (a template that has imported the engine forks it and
  forks it again when it dies), with and without the gms, side by side: its worker is SIGKILLed,
  and the time from the kill until the worker forked in its place is SERVING and gives its first
  token. Both modes preload what their start imports (transformers and the model class for disk).
* Takeover: an active worker and a standby (``--standby-lock``, weights mapped from the gms)
  share a lock file; the active one is SIGKILLed; time until the standby is SERVING.
* Memory: two workers side by side, each after one request (every weight page touched), the
  proportional set size (PSS) of both, of the weight mappings alone (the model's safetensors
  file, or the gms memory; their share of the total) and the kernel's split into anonymous, file
  and shared memory, with and without the gms. The gms is empty at first, so one of the two
  publishes (through a child process). Goal: with the gms at most 0.75x.

``--model-path`` picks the weights: by default a copy of the shipped model in the bench's own
folder (float32 safetensors, which transformers maps from the file as they are: workers without
the gms share them through the page cache; a copy, so that no other process on the machine
shares those pages and shrinks the PSS measured), or, for instance, a bfloat16 copy
(``--make-bf16 DIR`` writes one), which the engine converts to float32 at load, so that each
worker without the gms holds a private copy. ``--make-model DIR [--shape smollm2-1.7b]`` writes
a bfloat16 checkpoint of a larger member of the same family (its published shape, the shipped
tokenizer, random weights: no larger model can be fetched here, and loading does not depend on
the values), the size at which weights, not imports, dominate a start.

Prints tables and writes JSON to bench/results/gms.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import plots
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.gms import LockState, get_info

RESULTS = Path(__file__).parent / "results" / "gms.json"
MODEL = "SmolLM2-135M-Instruct"
WEIGHT_MAPPINGS = ("memfd:tokenyard-gms", ".safetensors")


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    def start(self) -> Child:
        self.started = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Bench:
    args: argparse.Namespace
    root: Path
    children: list[Child] = field(default_factory=list)
    _next_port: int = 0

    @property
    def socket(self) -> str:
        return str(self.root / "gms.sock")

    @property
    def discovery(self) -> str:
        return f"dir://{self.root / 'discovery'}"

    def port(self) -> int:
        self._next_port += 1
        return int(self.args.port_base + self._next_port)

    def cli(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "tokenyard.cli", *argv]

    def gms(self) -> Child:
        child = Child(
            "gms",
            self.cli("gms", "--socket", self.socket, "--metrics-port", "0", "--discovery", self.discovery),
            self.root / "gms.log",
        )
        self.children.append(child.start())
        deadline = time.monotonic() + 60
        while True:
            try:
                get_info(self.socket)
                return child
            except Exception:
                if time.monotonic() > deadline or not child.alive():
                    raise RuntimeError(f"the gms did not start:\n{child.output()}") from None
                time.sleep(0.05)

    def worker(self, name: str, *, gms: bool, extra: Sequence[str] = ()) -> Child:
        port = self.port()
        flags = [
            "worker", "--engine", "cpu", "--model", MODEL, "--port", str(port), "--metrics-port", "0",
            "--discovery", self.discovery, "--cpu-num-threads", str(self.args.threads),
            "--grace-period", "1",
        ]  # fmt: skip
        if self.args.model_path:
            flags += ["--cpu-model-path", self.args.model_path]
        if self.args.kv_blocks:
            flags += ["--cpu-num-kv-blocks", str(self.args.kv_blocks)]
        if gms:
            flags += ["--cpu-gms", "--cpu-gms-socket", self.socket]
        child = Child(name, self.cli(*flags, *extra), self.root / f"{name}.log", port)
        self.children.append(child)
        return child.start()

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop(signal.SIGKILL)


def wait_serving(child: Child, timeout: float = 600) -> float:
    """Seconds from the child's start until its health is SERVING."""
    deadline = time.monotonic() + timeout
    while True:
        # A fresh channel each time: one that failed to connect backs off (a second or more) and
        # would report SERVING late.
        with grpc.insecure_channel(f"127.0.0.1:{child.port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - child.started
            except grpc.RpcError:
                pass
        if not child.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} never became SERVING:\n{child.output()[-3000:]}")
        time.sleep(0.005)


def first_token(child: Child, request_id: str) -> float:
    """Seconds from the child's start until its first generated token (a one-token request)."""
    request = worker_pb2.GenerateRequest(request_id=request_id, model=MODEL, token_ids=list(range(1, 33)))
    request.stop.max_tokens = 1
    with grpc.insecure_channel(f"127.0.0.1:{child.port}") as channel:
        for reply in worker_pb2_grpc.WorkerServiceStub(channel).Generate(request, timeout=300):
            if reply.token_ids:
                return time.monotonic() - child.started
    raise RuntimeError(f"{child.name} produced no token")


STARTUP_PHASES = ("engine_began_s", "weights_s", "kv_s", "engine_ready_s")


def startup_phases(child: Child) -> dict[str, float]:
    """The CPU engine's own startup line (the last one: a template logs one per worker it forks):
    when (after the process started) the engine began loading, the weights, the KV pools, when it
    was ready; each in seconds."""
    for line in reversed(child.output().splitlines()):
        if "CPU engine startup:" in line:
            text = line.split("CPU engine startup:", 1)[1]
            numbers = [float(word.rstrip("s,")) for word in text.split() if word.rstrip("s,")[:1].isdigit()]
            if len(numbers) == len(STARTUP_PHASES):
                return dict(zip(STARTUP_PHASES, numbers, strict=True))
    return {}


def load_seconds(child: Child) -> float | None:
    """The engine's own figure for loading (disk) or mapping (gms) the weights, from its log."""
    for line in child.output().splitlines():
        if " in " in line and (("engines.cpu.model" in line and "loaded " in line) or "mapped " in line):
            try:
                return float(line.rsplit(" in ", 1)[1].split("s")[0])
            except ValueError:
                continue
    return None


def pss_kib(pid: int) -> dict[str, int]:
    """PSS of a process, KiB: ``total``, ``weights`` (the weight mappings: the safetensors file or
    the gms memory) and, from the kernel's rollup, ``anon``, ``file`` and ``shmem`` (the gms
    memory is shared memory)."""
    total = weights = 0
    current_is_weights = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            first = line.split(" ", 1)[0]
            if "-" in first and not first.endswith(":"):
                current_is_weights = any(m in line for m in WEIGHT_MAPPINGS)
            elif first == "Pss:":
                kib = int(line.split()[1])
                total += kib
                if current_is_weights:
                    weights += kib
    out = {"total": total, "weights": weights}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name = line.split(":", 1)[0]
            if name in ("Pss_Anon", "Pss_File", "Pss_Shmem"):
                out[name.removeprefix("Pss_").lower()] = int(line.split()[1])
    return out


# ---- the measurements -------------------------------------------------------------------------


RESTART_METRICS = (
    "serving_s",
    "first_token_s",
    "engine_began_s",
    "weights_s",
    "kv_s",
    "engine_ready_s",
    "server_s",
)


def restarts(bench: Bench) -> dict[str, Any]:
    gms = bench.gms()
    # First starts: fill the page cache (and convert a GGUF file), and fill the gms (the first
    # worker on an empty gms publishes: reported, not part of the comparison).
    first_start: dict[str, float] = {}
    for mode in (False, True):
        key = "gms" if mode else "disk"
        w = bench.worker(f"first-{key}", gms=mode)
        first_start[key] = wait_serving(w)
        first_token(w, "warm")
        w.stop()
    assert get_info(bench.socket).state is LockState.COMMITTED
    rows: dict[str, list[dict[str, float | None]]] = {"disk": [], "gms": []}
    for i in range(bench.args.rounds):
        for mode in (False, True):
            key = "gms" if mode else "disk"
            w = bench.worker(f"restart-{key}-{i}", gms=mode)
            serving = wait_serving(w)
            token = first_token(w, f"r{i}")
            phases = startup_phases(w)
            row: dict[str, float | None] = {
                "serving_s": serving,
                "first_token_s": token,
                "weights_s": phases.get("weights_s", load_seconds(w)),
                **{k: v for k, v in phases.items() if k != "weights_s"},
            }
            if "engine_ready_s" in phases:
                row["server_s"] = serving - phases["engine_ready_s"]
            rows[key].append(row)
            w.stop(signal.SIGKILL)  # a crash: nothing is handed back politely
            print(f"  round {i} {key:<5} SERVING {serving:6.2f}s  first token {token:6.2f}s", flush=True)
    gms.stop()

    def med(key: str, metric: str) -> float:
        values = [v for r in rows[key] if (v := r[metric]) is not None]
        return float(statistics.median(values)) if values else float("nan")

    summary = {key: {metric: med(key, metric) for metric in RESTART_METRICS} for key in rows}
    return {
        "first_start_serving_s": first_start,
        "rounds": rows,
        "median": summary,
        "speedup_serving": summary["disk"]["serving_s"] / summary["gms"]["serving_s"],
        "speedup_first_token": summary["disk"]["first_token_s"] / summary["gms"]["first_token_s"],
        "speedup_weights": summary["disk"]["weights_s"] / summary["gms"]["weights_s"]
        if summary["gms"]["weights_s"]
        else float("nan"),
    }


def service_pid(template: Child) -> int:
    """The worker a ``--respawn`` template forked (its one child)."""
    assert template.proc is not None
    pid = template.proc.pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(children) == 1:
            return int(children[0])
        time.sleep(0.01)
    raise RuntimeError(f"{template.name} has no single worker process")


def respawns(bench: Bench) -> dict[str, Any]:
    """``--respawn`` templates with and without the gms: each round starts one of each, SIGKILLs
    its worker once it serves, and times the kill to SERVING and to the first token of the worker
    forked in its place. A fresh template per round: a template replaces the first crash at once
    and backs off from the second (a crash loop), which is not what is measured here."""
    gms = bench.gms()
    rows: dict[str, list[dict[str, float | None]]] = {"disk": [], "gms": []}
    for i in range(bench.args.rounds):
        for mode in (False, True):
            key = "gms" if mode else "disk"
            template = bench.worker(f"respawn-{key}-{i}", gms=mode, extra=["--respawn"])
            wait_serving(template)
            first_token(template, "warm")
            os.kill(service_pid(template), signal.SIGKILL)
            template.started = time.monotonic()
            serving = wait_serving(template)
            token = first_token(template, f"respawn{i}")
            phases = startup_phases(template)
            template.stop()
            rows[key].append(
                {
                    "serving_s": serving,
                    "first_token_s": token,
                    "weights_s": phases.get("weights_s"),
                    "engine_ready_s": phases.get("engine_ready_s"),
                }
            )
            print(
                f"  round {i} {key:<5} killed -> SERVING {serving * 1000:6.0f} ms  first token {token * 1000:6.0f} ms",
                flush=True,
            )
    gms.stop()

    def med(key: str, metric: str) -> float:
        values = [v for r in rows[key] if (v := r[metric]) is not None]
        return float(statistics.median(values)) if values else float("nan")

    metrics = ("serving_s", "first_token_s", "weights_s", "engine_ready_s")
    summary = {key: {metric: med(key, metric) for metric in metrics} for key in rows}
    return {
        "rounds": rows,
        "median": summary,
        "speedup_serving": summary["disk"]["serving_s"] / summary["gms"]["serving_s"],
        "speedup_first_token": summary["disk"]["first_token_s"] / summary["gms"]["first_token_s"],
    }


def takeover(bench: Bench) -> dict[str, Any]:
    gms = bench.gms()
    lock = ["--standby-lock", str(bench.root / "worker.lock")]
    active = bench.worker("active", gms=True, extra=lock)
    wait_serving(active)
    standby = bench.worker("standby", gms=True, extra=lock)
    deadline = time.monotonic() + 600
    while "another worker holds" not in standby.output():
        if time.monotonic() > deadline or not standby.alive():
            raise RuntimeError(f"the standby never got ready:\n{standby.output()[-3000:]}")
        time.sleep(0.05)
    readers = get_info(bench.socket).reader_count
    active.stop(signal.SIGKILL)
    killed = time.monotonic()
    standby.started = killed
    serving = wait_serving(standby)
    token = first_token(standby, "takeover")
    standby.stop()
    gms.stop()
    return {"readers_before_kill": readers, "kill_to_serving_s": serving, "kill_to_first_token_s": token}


def memory(bench: Bench) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in (False, True):
        key = "gms" if mode else "disk"
        gms = bench.gms() if mode else None
        workers = [bench.worker(f"pss-{key}-{i}", gms=mode) for i in range(2)]
        for w in workers:
            wait_serving(w)
        for i, w in enumerate(workers):
            first_token(w, f"pss-{i}")
        time.sleep(1)
        per = [pss_kib(w.proc.pid) for w in workers if w.proc is not None]
        out[key] = {
            "workers_pss_mib": sum(p["total"] for p in per) / 1024,
            "weights_pss_mib": sum(p["weights"] for p in per) / 1024,
            "per_worker_pss_mib": [p["total"] / 1024 for p in per],
            "per_worker_mib": [{k: v / 1024 for k, v in p.items()} for p in per],
        }
        out[key]["weights_share"] = out[key]["weights_pss_mib"] / out[key]["workers_pss_mib"]
        if gms is not None and gms.proc is not None:
            out[key]["gms_pss_mib"] = pss_kib(gms.proc.pid)["total"] / 1024
            out[key]["gms_allocated_mib"] = get_info(bench.socket).allocated_bytes / 2**20
        for w in workers:
            w.stop()
        if gms is not None:
            gms.stop()
    out["ratio_workers"] = out["gms"]["workers_pss_mib"] / out["disk"]["workers_pss_mib"]
    out["ratio_with_gms_process"] = (out["gms"]["workers_pss_mib"] + out["gms"]["gms_pss_mib"]) / out["disk"][
        "workers_pss_mib"
    ]
    return out


def make_bf16(target: Path) -> None:
    """A bfloat16 copy of the shipped model (what many checkpoints are), for --model-path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenyard.worker.engines.cpu.config import CpuEngineConfig
    from tokenyard.worker.engines.cpu.model import load_model

    source = load_model(CpuEngineConfig()).weights_dir
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    print(f"wrote a bfloat16 copy of {source.name} to {target}")


SHAPES: dict[str, dict[str, int]] = {
    # SmolLM2-1.7B's published configuration (the family's largest; the same tokenizer).
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 8192,
        "rope_theta": 130000,
    },
    "smollm2-360m": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "max_position_embeddings": 8192,
        "rope_theta": 100000,
    },
}


def make_model(target: Path, shape: str) -> None:
    """A bfloat16 checkpoint of a larger member of the shipped model's family, with random weights
    (no larger model can be fetched here): what a restart loads does not depend on the values.
    The shipped model's configuration and tokenizer, with the shape of ``SHAPES[shape]``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = shipped_model_dir()
    config: Any = AutoConfig.from_pretrained(source)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):  # where recent transformers reads the RoPE base from
        rope["rope_theta"] = float(SHAPES[shape]["rope_theta"])
    config.head_dim = config.hidden_size // config.num_attention_heads
    config.dtype = torch.bfloat16
    config._name_or_path = config._model_name_or_path = f"{shape} (random weights)"
    with torch.device("meta"):
        skeleton: Any = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in skeleton.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to the embedding, as in the published checkpoints
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    params = sum(t.numel() for t in tensors.values())
    print(
        f"wrote a {shape} checkpoint ({params / 1e9:.2f}B parameters, bfloat16, random weights) to {target}"
    )


def shipped_model_dir() -> Path:
    """The shipped model's converted folder (converting the GGUF file first if needed)."""
    from tokenyard.worker.engines.cpu.config import CpuEngineConfig
    from tokenyard.worker.engines.cpu.model import load_model, resolve_weights

    source, _ = resolve_weights(CpuEngineConfig())
    if not (source / "config.json").is_file():
        load_model(CpuEngineConfig())
    return source


def private_copy(target: Path) -> Path:
    """The shipped model's converted folder, copied (converting the GGUF file first if needed)."""
    import shutil

    shutil.copytree(shipped_model_dir(), target)
    return target


@contextmanager
def bench_root() -> Iterator[Path]:
    # Unix socket paths must stay short: not under a deep temporary folder.
    root = Path(tempfile.mkdtemp(prefix="tyg-bench-", dir="/tmp"))
    try:
        yield root
    finally:
        for path in sorted(root.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        root.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="restarts measured per mode")
    parser.add_argument("--threads", type=int, default=1, help="--cpu-num-threads of each worker")
    parser.add_argument(
        "--kv-blocks", type=int, default=0, help="--cpu-num-kv-blocks (0: the engine default, 1 GiB)"
    )
    parser.add_argument("--model-path", default="", help="--cpu-model-path (default: the shipped model)")
    parser.add_argument("--port-base", type=int, default=20100)
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to skip: restart,respawn,takeover,memory"
    )
    parser.add_argument(
        "--make-bf16", metavar="DIR", help="write a bfloat16 copy of the model to DIR and exit"
    )
    parser.add_argument(
        "--make-model",
        metavar="DIR",
        help="write a bfloat16 checkpoint of --shape (random weights, the shipped tokenizer) to DIR and exit",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-1.7b", help="for --make-model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.make_bf16:
        make_bf16(Path(args.make_bf16))
        return
    if args.make_model:
        target = Path(args.make_model)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            parser.error(f"--make-model: {target} exists and is not an empty folder")
        make_model(target, args.shape)
        return
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load": os.getloadavg(),
        },
        "model_path": args.model_path or "a copy of the shipped smollm2 (float32)",
        "threads": args.threads,
        "kv_blocks": args.kv_blocks or "default (1 GiB)",
    }
    with bench_root() as root:
        if not args.model_path:
            args.model_path = str(private_copy(root / "model"))
        bench = Bench(args, root)
        try:
            if "restart" not in skip:
                print("restarts (alternating):", flush=True)
                results["restart"] = restarts(bench)
            if "respawn" not in skip:
                print("respawns from a template (--respawn):", flush=True)
                results["respawn"] = respawns(bench)
            if "takeover" not in skip:
                results["takeover"] = takeover(bench)
            if "memory" not in skip:
                results["memory"] = memory(bench)
        finally:
            bench.close()
    results["machine"]["load_after"] = os.getloadavg()
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    charts = _charts(results)
    if charts:
        plots.save(args.out, plots.Chart(charts, title=f"gms: {results['model_path']}"))


def _charts(r: dict[str, Any]) -> list[plots.Bars | plots.Lines]:
    charts: list[plots.Bars | plots.Lines] = []
    if "restart" in r:
        m = r["restart"]["median"]
        labels = {"serving_s": "to SERVING", "first_token_s": "to first token", "weights_s": "weights"}
        series: dict[str, dict[str, float | None]] = {
            key: {label: m[key][metric] for metric, label in labels.items()} for key in ("disk", "gms")
        }
        if "takeover" in r:
            series["standby takeover"] = {
                "to SERVING": r["takeover"]["kill_to_serving_s"],
                "to first token": r["takeover"]["kill_to_first_token_s"],
            }
        charts.append(plots.Bars("restart (median)", "s", series))
    if "memory" in r:
        mem = r["memory"]
        charts.append(
            plots.Bars(
                "two workers, PSS",
                "MiB",
                {
                    key: {"total": mem[key]["workers_pss_mib"], "weights": mem[key]["weights_pss_mib"]}
                    for key in ("disk", "gms")
                },
            )
        )
    return charts


def report(r: dict[str, Any]) -> None:
    print(f"\ngms bench: {r['model_path']}, {r['threads']} thread(s) per worker, KV {r['kv_blocks']}")
    print(f"machine: {r['machine']['cores']} cores, load average {r['machine']['load'][0]:.1f} at start")
    if "restart" in r:
        m = r["restart"]["median"]
        print(f"\n{'restart (median)':<34} {'disk':>8} {'gms':>8} {'ratio':>8}")
        for metric, label in (
            ("serving_s", "to SERVING"),
            ("first_token_s", "to first token"),
            ("engine_began_s", "  engine began (imports, settings)"),
            ("weights_s", "  weights"),
            ("kv_s", "  KV pools"),
            ("engine_ready_s", "  engine ready"),
            ("server_s", "  then SERVING (server, discovery)"),
        ):
            speed = m["disk"][metric] / m["gms"][metric] if m["gms"][metric] else float("nan")
            print(f"{label:<34} {m['disk'][metric]:>7.2f}s {m['gms'][metric]:>7.2f}s {speed:>7.1f}x")
        first = r["restart"]["first_start_serving_s"]
        print(
            f"first starts (not compared): disk {first['disk']:.2f}s, gms {first['gms']:.2f}s "
            "(publishes the weights through a child process)"
        )
        print("goal: to SERVING at least 5x faster with the gms")
    if "respawn" in r:
        m = r["respawn"]["median"]
        print(f"\n{'respawn from a template (median)':<34} {'disk':>8} {'gms':>8} {'ratio':>8}")
        for metric, label in (
            ("serving_s", "kill to SERVING"),
            ("first_token_s", "kill to first token"),
            ("weights_s", "  weights"),
            ("engine_ready_s", "  engine ready after fork"),
        ):
            speed = m["disk"][metric] / m["gms"][metric] if m["gms"][metric] else float("nan")
            print(f"{label:<34} {m['disk'][metric]:>7.3f}s {m['gms'][metric]:>7.3f}s {speed:>7.1f}x")
        if "restart" in r:
            cold = r["restart"]["median"]["disk"]["serving_s"]
            print(
                f"a cold restart (new process, weights from disk) {cold:.2f}s against a respawn with the "
                f"gms {m['gms']['serving_s']:.3f}s: {cold / m['gms']['serving_s']:.1f}x"
            )
    if "takeover" in r:
        t = r["takeover"]
        print(
            f"\nstandby takeover: SERVING {t['kill_to_serving_s'] * 1000:.0f} ms after the kill, first token "
            f"{t['kill_to_first_token_s'] * 1000:.0f} ms ({t['readers_before_kill']} gms readers before)"
        )
    if "memory" in r:
        mem = r["memory"]
        print(
            f"\n{'two workers, PSS (MiB)':<24} {'total':>7} {'weights':>8} {'share':>6} {'anon':>6} {'file':>6} {'shmem':>6}"
        )
        for key in ("disk", "gms"):
            k = mem[key]
            parts = {p: sum(w[p] for w in k["per_worker_mib"]) for p in ("anon", "file", "shmem")}
            print(
                f"{key:<24} {k['workers_pss_mib']:>7.0f} {k['weights_pss_mib']:>8.0f} {k['weights_share']:>6.0%} "
                f"{parts['anon']:>6.0f} {parts['file']:>6.0f} {parts['shmem']:>6.0f}"
            )
        print(
            f"gms process itself: {mem['gms']['gms_pss_mib']:.0f} MiB PSS, {mem['gms']['gms_allocated_mib']:.0f} MiB allocated"
        )
        print(
            f"ratio gms/disk: workers {mem['ratio_workers']:.2f}x, with the gms process {mem['ratio_with_gms_process']:.2f}x (goal <= 0.75x)"
        )


if __name__ == "__main__":
    main()
