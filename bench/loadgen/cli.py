"""Command line: one run, or an A/B comparison of two or more configurations in one invocation.

A configuration is the base flags plus its own overrides: ``--ab "A flags" "B flags"`` parses
each string with this same parser on top of the base flags, and two ``--target`` URLs are the
shorthand for configurations that differ only in target. Runs go one configuration after
another; ``--ab-rounds N`` alternates them N times (A B A B ...) and merges each one's rounds,
so that drift over time (a warming cache, a noisy neighbour) falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import aiohttp

from bench.loadgen.client import (
    Endpoint,
    RequestRecord,
    discover_model,
    endpoint_url,
    models_url,
    open_session,
    stream_request,
)
from bench.loadgen.cpu import CpuMeter, CpuReport, ProcessCpu
from bench.loadgen.progress import Progress, ProgressMode
from bench.loadgen.report import RunReport, comparison_table, run_table, write_results
from bench.loadgen.runner import LoadShape, run_load
from bench.loadgen.stats import summarize
from bench.loadgen.workload import (
    MooncakeWorkload,
    RequestSpec,
    SharedPrefixWorkload,
    TokenRange,
    Workload,
    load_trace,
)

DEFAULT_TARGET = "http://127.0.0.1:8000"
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
DEFAULT_SYNTHETIC_REQUESTS = 100
# Flags about the invocation as a whole, which a configuration string may not override.
INVOCATION_FLAGS = frozenset(
    {"ab", "labels", "ab_rounds", "name", "output", "save_requests", "progress"}
    | {f"{verb}_{side}" for verb in ("setup", "teardown") for side in ("a", "b")}
)
LOAD_MODES = ("concurrency", "rate", "fixed_schedule")

EXAMPLES = """\
examples:
  python -m bench.loadgen --concurrency 16 --num-requests 500
  python -m bench.loadgen --rate 20 --duration 60 --num-prefixes 4 --prefix-len 2048 --suffix-len 256
  python -m bench.loadgen --trace mooncake.jsonl --fixed-schedule --speedup 2 --prompt-format tokens
  python -m bench.loadgen --target http://127.0.0.1:8000 --target http://127.0.0.1:9000 --labels kv,random
  python -m bench.loadgen --ab "" "--header 'x-tokenyard-router-mode: random'" --ab-rounds 2
"""


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _header(text: str) -> tuple[str, str]:
    sep = ":" if ":" in text else "="
    name, found, value = text.partition(sep)
    if not found or not name.strip():
        raise argparse.ArgumentTypeError(f"header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


def _token_range(text: str) -> TokenRange:
    try:
        return TokenRange.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _pids(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"pids {text!r}: expected a comma-separated list") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="Streaming load generator for OpenAI-compatible endpoints (Tokenyard's frontend).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t = p.add_argument_group("target")
    t.add_argument(
        "--target",
        action="append",
        metavar="URL",
        help=f"server base URL (default {DEFAULT_TARGET}); give two for an A/B run",
    )
    t.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="/v1/completions or /v1/chat/completions (default completions)",
    )
    t.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    t.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header, repeatable (routing hints, auth)",
    )
    t.add_argument(
        "--extra-body",
        type=_json_object,
        default={},
        metavar="JSON",
        help="JSON object merged into every request body",
    )
    t.add_argument(
        "--prompt-format",
        choices=("text", "tokens"),
        default="text",
        help="prompts as pseudo-word text, or as token-id lists (completions only; exact lengths)",
    )
    t.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos and min_tokens so every request generates its full output length",
    )
    t.add_argument(
        "--request-timeout", type=float, default=600.0, metavar="S", help="per request (default 600)"
    )
    w = p.add_argument_group("workload (synthetic shared prefixes, unless --trace)")
    w.add_argument("--num-prefixes", type=int, default=10, help="distinct shared prefixes (default 10)")
    w.add_argument("--prefix-len", type=int, default=512, help="tokens per shared prefix (default 512)")
    w.add_argument("--suffix-len", type=int, default=128, help="unique tokens after the prefix (default 128)")
    w.add_argument("--output-len", type=int, default=64, help="tokens to generate (default 64)")
    w.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    w.add_argument(
        "--token-range",
        type=_token_range,
        default=TokenRange(),
        metavar="LOW:HIGH",
        help="token ids are drawn from [LOW, HIGH) (default 1000:30000)",
    )
    w.add_argument(
        "--trace",
        type=Path,
        metavar="JSONL",
        help="replay a Mooncake trace (timestamp ms, input_length, output_length, hash_ids)",
    )
    w.add_argument("--block-size", type=int, default=512, help="tokens per trace hash_id block (default 512)")
    w.add_argument("--fixed-schedule", action="store_true", help="send trace requests at their timestamps")
    w.add_argument("--speedup", type=float, default=1.0, help="replay the schedule this many times faster")
    lo = p.add_argument_group("load (default: --concurrency 8; bound: 100 requests, or the whole trace)")
    lo.add_argument("--concurrency", type=int, help="closed loop: keep N requests in flight")
    lo.add_argument("--rate", type=float, help="open loop: R requests per second")
    lo.add_argument(
        "--arrival",
        choices=("poisson", "constant"),
        default="poisson",
        help="inter-arrival times at --rate (default poisson)",
    )
    lo.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    lo.add_argument("--num-requests", type=int, help="measured requests to send")
    lo.add_argument("--duration", type=float, metavar="S", help="stop sending after S seconds")
    lo.add_argument("--warmup", type=int, default=0, help="requests sent first and left out of the results")
    c = p.add_argument_group("server CPU")
    c.add_argument(
        "--pids", type=_pids, default=[], metavar="PID,PID", help="processes to account CPU time of"
    )
    c.add_argument(
        "--measure-cpu-of",
        metavar="REGEX",
        help="account CPU time of the processes whose command line matches",
    )
    ab = p.add_argument_group("configurations (A/B)")
    ab.add_argument(
        "--ab",
        nargs=2,
        metavar=("FLAGS_A", "FLAGS_B"),
        help="two configurations, each a string of flags (or a file of them) applied over the others",
    )
    ab.add_argument("--labels", help="comma-separated configuration names (default A,B,...)")
    ab.add_argument(
        "--ab-rounds", type=int, default=1, help="alternate the configurations N times (default 1)"
    )
    ab.add_argument("--setup", metavar="CMD", help="shell command run before a configuration's run")
    ab.add_argument("--teardown", metavar="CMD", help="shell command run after a configuration's run")
    for side in ("a", "b"):
        ab.add_argument(f"--setup-{side}", metavar="CMD", help=f"--setup for configuration {side.upper()}")
        ab.add_argument(
            f"--teardown-{side}", metavar="CMD", help=f"--teardown for configuration {side.upper()}"
        )
    ab.add_argument(
        "--ready-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="after a setup command, wait this long for /v1/models to answer (default 120)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--name", default="loadgen", help="results name: bench/results/NAME.json (default loadgen)"
    )
    o.add_argument("--output", type=Path, help="results path (overrides --name's)")
    o.add_argument("--save-requests", action="store_true", help="also write every request's measurements")
    o.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="live line on stderr: auto = on a terminal only (default)",
    )
    return p


def _override_parser() -> argparse.ArgumentParser:
    """The same flags with no defaults, so a configuration string yields only what it sets."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def apply_overrides(
    base: argparse.Namespace, flags: str, parser: argparse.ArgumentParser
) -> argparse.Namespace:
    if flags.strip() and Path(flags.strip()).is_file():
        flags = Path(flags.strip()).read_text()
    given = vars(_override_parser().parse_args(shlex.split(flags, comments=True)))
    forbidden = sorted(k for k in given if k in INVOCATION_FLAGS)
    if forbidden:
        parser.error(
            f"--ab configuration {flags!r} may not set {', '.join('--' + k.replace('_', '-') for k in forbidden)}"
        )
    merged = copy.deepcopy(base)
    if any(k in given for k in LOAD_MODES):
        # A configuration that picks a load mode replaces the base's, instead of conflicting with it.
        for k in LOAD_MODES:
            setattr(merged, k, False if k == "fixed_schedule" else None)
    for key, value in given.items():
        if key == "header":
            merged.header = [*base.header, *value]
        elif key == "extra_body":
            merged.extra_body = {**base.extra_body, **value}
        else:
            setattr(merged, key, value)
    return merged


@dataclass
class Config:
    label: str
    ns: argparse.Namespace

    @property
    def target(self) -> str:
        targets: list[str] = self.ns.target or [DEFAULT_TARGET]
        return targets[0]


def configurations(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Config]:
    if ns.ab:
        if ns.target and len(ns.target) > 1:
            parser.error("with --ab, give one --target, or one inside each configuration")
        variants = [apply_overrides(ns, flags, parser) for flags in ns.ab]
        if any(v.target and len(v.target) > 1 for v in variants):
            parser.error("an --ab configuration may name one --target")
    elif ns.target and len(ns.target) > 1:
        variants = []
        for target in ns.target:
            v = copy.deepcopy(ns)
            v.target = [target]
            variants.append(v)
    else:
        variants = [ns]
    labels = ns.labels.split(",") if ns.labels else [chr(ord("A") + i) for i in range(len(variants))]
    if len(labels) != len(variants) or len(set(labels)) != len(labels):
        parser.error(f"--labels needs {len(variants)} distinct names")
    if len(variants) == 1 and not ns.labels:
        labels = [ns.name]
    for i, side in enumerate(("a", "b")[: len(variants)]):
        for verb in ("setup", "teardown"):
            if getattr(ns, f"{verb}_{side}"):
                setattr(variants[i], verb, getattr(ns, f"{verb}_{side}"))
    configs = [Config(label, v) for label, v in zip(labels, variants, strict=True)]
    for cfg in configs:
        _validate(cfg, parser)
    return configs


def _validate(cfg: Config, parser: argparse.ArgumentParser) -> None:
    ns = cfg.ns
    if ns.prompt_format == "tokens" and ns.endpoint == "chat":
        parser.error(f"[{cfg.label}] --prompt-format tokens needs --endpoint completions")
    if ns.fixed_schedule and not ns.trace:
        parser.error(f"[{cfg.label}] --fixed-schedule replays a --trace")
    if ns.ab_rounds < 1:
        parser.error("--ab-rounds must be at least 1")
    try:
        load_shape(ns, None)
    except ValueError as exc:
        parser.error(f"[{cfg.label}] {exc}")


def make_workload(ns: argparse.Namespace) -> Workload:
    if ns.trace:
        workload = MooncakeWorkload(
            load_trace(ns.trace),
            block_size=ns.block_size,
            seed=ns.seed,
            tokens=ns.token_range,
            path=str(ns.trace),
        )
        if ns.fixed_schedule and not workload.has_timestamps:
            raise ValueError(f"{ns.trace}: --fixed-schedule needs a timestamp on every row")
        return workload
    return SharedPrefixWorkload(
        num_prefixes=ns.num_prefixes,
        prefix_len=ns.prefix_len,
        suffix_len=ns.suffix_len,
        output_len=ns.output_len,
        seed=ns.seed,
        tokens=ns.token_range,
    )


def load_shape(ns: argparse.Namespace, workload: Workload | None) -> LoadShape:
    concurrency = ns.concurrency
    if concurrency is None and ns.rate is None and not ns.fixed_schedule:
        concurrency = 8
    num_requests = ns.num_requests
    if num_requests is None and ns.duration is None and not ns.trace:
        num_requests = DEFAULT_SYNTHETIC_REQUESTS
    return LoadShape(
        concurrency=concurrency,
        rate=ns.rate,
        arrival=ns.arrival,
        fixed_schedule=ns.fixed_schedule,
        speedup=ns.speedup,
        max_concurrency=ns.max_concurrency,
        num_requests=num_requests,
        duration_s=ns.duration,
        seed=ns.seed,
    )


def describe_load(shape: LoadShape) -> str:
    if shape.concurrency is not None:
        text = f"concurrency {shape.concurrency}"
    elif shape.fixed_schedule:
        text = f"fixed schedule x{shape.speedup:g}"
    else:
        text = f"{shape.arrival} {shape.rate:g} req/s"
    if shape.max_concurrency and shape.concurrency is None:
        text += f", at most {shape.max_concurrency} in flight"
    return text


async def shell(label: str, what: str, command: str) -> None:
    print(f"[{label}] {what}: {command}", file=sys.stderr, flush=True)
    # The command's stdout goes to stderr so that stdout carries only the result tables.
    proc = await asyncio.create_subprocess_shell(command, stdout=2)
    rc = await proc.wait()
    if rc != 0:
        raise RuntimeError(f"[{label}] {what} command exited with status {rc}: {command}")


async def wait_ready(target: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(models_url(target)) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{target} did not answer /v1/models within {timeout_s:g} s")
            await asyncio.sleep(0.5)


@dataclass
class Outcome:
    """One configuration's measured requests, over all its rounds."""

    records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0
    cpu: dict[int, ProcessCpu] | None = None
    model: str = ""
    endpoint: str = ""
    rounds: int = 0
    specs: Iterator[RequestSpec] | None = None
    """An endless workload goes on across rounds, so no round repeats another's prompts; a trace restarts."""

    def add_cpu(self, report: CpuReport) -> None:
        cpu = self.cpu if self.cpu is not None else {}
        for p in report.processes:
            seen = cpu.get(p.pid)
            cpu[p.pid] = p if seen is None else ProcessCpu(p.pid, p.name, seen.seconds + p.seconds)
        self.cpu = cpu

    def cpu_report(self) -> CpuReport | None:
        if self.cpu is None:
            return None
        return CpuReport(
            sum(p.seconds for p in self.cpu.values()), sorted(self.cpu.values(), key=lambda p: p.pid)
        )


async def run_config(cfg: Config, outcome: Outcome, progress_mode: ProgressMode, stop: asyncio.Event) -> None:
    ns = cfg.ns
    if ns.setup:
        await shell(cfg.label, "setup", ns.setup)
    try:
        if ns.setup:
            await wait_ready(cfg.target, ns.ready_timeout)
        workload = make_workload(ns)
        shape = load_shape(ns, workload)
        async with open_session(shape.pool_size, ns.request_timeout) as session:
            model = ns.model or await discover_model(session, cfg.target) or "default"
            endpoint = Endpoint(
                url=endpoint_url(cfg.target, ns.endpoint),
                api=ns.endpoint,
                model=model,
                headers=dict(ns.header),
                extra_body=ns.extra_body,
                prompt_format=ns.prompt_format,
                ignore_eos=ns.ignore_eos,
            )
            outcome.model, outcome.endpoint = model, endpoint.url
            send = partial(stream_request, session, endpoint)
            if outcome.specs is None or workload.size is not None:
                outcome.specs = iter(workload)
            specs = outcome.specs
            if ns.warmup:
                warm = LoadShape(concurrency=min(ns.warmup, shape.pool_size or 8), num_requests=ns.warmup)
                await run_load(send, itertools.islice(specs, ns.warmup), warm, stop=stop)
            meter = CpuMeter(ns.pids, ns.measure_cpu_of) if ns.pids or ns.measure_cpu_of else None
            if meter is not None:
                meter.start()
            sizes = [n for n in (shape.num_requests, workload.size) if n is not None]
            if workload.size is not None:
                sizes.append(max(workload.size - ns.warmup, 0))
            total = min(sizes) if sizes else None
            async with Progress(
                cfg.label, total=total, duration_s=shape.duration_s, mode=progress_mode
            ) as progress:
                result = await run_load(send, specs, shape, progress, stop)
            if meter is not None:
                outcome.add_cpu(meter.stop())
        outcome.records.extend(result.records)
        outcome.duration_s += result.duration_s
        outcome.rounds += 1
    finally:
        if ns.teardown:
            await shell(cfg.label, "teardown", ns.teardown)


def config_json(cfg: Config, outcome: Outcome, rounds: int) -> dict[str, object]:
    ns = cfg.ns
    workload = make_workload(ns)
    shape = load_shape(ns, workload)
    return {
        "target": cfg.target,
        "endpoint": outcome.endpoint,
        "model": outcome.model,
        "headers": dict(ns.header),
        "extra_body": ns.extra_body,
        "prompt_format": ns.prompt_format,
        "ignore_eos": ns.ignore_eos,
        "load": describe_load(shape),
        "shape": asdict(shape),
        "workload": workload.describe(),
        "warmup": ns.warmup,
        "rounds": rounds,
        "setup": ns.setup,
        "teardown": ns.teardown,
        "cpu_of": {"pids": ns.pids, "pattern": ns.measure_cpu_of} if ns.pids or ns.measure_cpu_of else None,
    }


async def run_cli(argv: Sequence[str] | None = None, stop: asyncio.Event | None = None) -> int:
    """Runs every configuration, prints the tables, writes the JSON.

    Exit status: 0 when every configuration had a successful request, 1 when one had none, 2 on a
    setup or configuration error, 130 when interrupted (the runs that finished are still reported).
    """
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(args)
    configs = configurations(ns, parser)
    stop = stop if stop is not None else asyncio.Event()
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    outcomes = {cfg.label: Outcome() for cfg in configs}
    try:
        for _ in range(ns.ab_rounds):
            for cfg in configs:
                if stop.is_set():
                    break
                await run_config(cfg, outcomes[cfg.label], ns.progress, stop)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # An interrupted invocation reports the configurations that ran, not those it never reached.
    ran = [cfg for cfg in configs if outcomes[cfg.label].rounds]
    if not ran:
        print("error: interrupted before any run finished", file=sys.stderr)
        return 130
    reports = [
        RunReport(
            label=cfg.label,
            config=config_json(cfg, outcomes[cfg.label], outcomes[cfg.label].rounds),
            summary=summarize(outcomes[cfg.label].records, outcomes[cfg.label].duration_s),
            cpu=outcomes[cfg.label].cpu_report(),
            records=outcomes[cfg.label].records,
        )
        for cfg in ran
    ]
    for report in reports:
        print(run_table(report))
        print()
    if len(reports) > 1:
        print(comparison_table(reports))
    path = ns.output or RESULTS_DIR / f"{ns.name}.json"
    write_results(path, ns.name, args, reports, ns.save_requests, created)
    print(f"results: {path}")
    if stop.is_set():
        return 130
    return 0 if all(r.summary.requests_ok for r in reports) else 1


async def _run_with_signals(argv: Sequence[str] | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def interrupted() -> None:
        print("\ninterrupted: waiting for the requests in flight (Ctrl-C again aborts)", file=sys.stderr)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, interrupted)
    try:
        return await run_cli(argv, stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_run_with_signals(argv))
