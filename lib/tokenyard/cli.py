"""``tokenyard``: one command, a subcommand per service plus tools to run and inspect a deployment."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# Subcommand -> (module with main(argv) -> int, one-line summary). Modules are imported lazily so
# that `tokenyard probe` in a container healthcheck does not pay for importing every service.
COMMANDS: dict[str, tuple[str, str]] = {
    "frontend": ("tokenyard.frontend.main", "OpenAI HTTP and KServe v2 gRPC entry point"),
    "router": ("tokenyard.router.main", "KV-cache-aware router"),
    "worker": ("tokenyard.worker.main", "engine worker (mocker, cpu, vllm)"),
    "planner": ("tokenyard.planner.main", "SLA planner that scales workers"),
    "profile": ("tokenyard.planner.profiler", "sweep a worker and write its performance profile"),
    "gms": ("tokenyard.gms.main", "memory service that keeps weights alive across restarts"),
    "up": ("tokenyard.deploy.up", "start a whole local deployment as processes on loopback"),
    "down": ("tokenyard.deploy.up", "stop a deployment started with `tokenyard up --detach`"),
    "status": ("tokenyard.deploy.status", "list registered instances and their health"),
    "probe": ("tokenyard.deploy.probe", "exit 0 iff a gRPC health check answers SERVING"),
    "certs": ("tokenyard.deploy.certs", "create a CA and per-service certificates for mTLS"),
}

_ENTRY = {"down": "main_down"}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: tokenyard COMMAND [flags]",
        "",
        "Distributed LLM inference serving as small gRPC services.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        "`tokenyard COMMAND --help` lists every flag with its env var and default.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"tokenyard {version('tokenyard')}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"tokenyard: error: unknown command {name!r} (see tokenyard --help)", file=sys.stderr)
        return 2
    # Started by `tokenyard up`: stop when it dies, however it dies.
    from tokenyard.deploy.parent_watch import stop_with_supervisor

    stop_with_supervisor()
    module = importlib.import_module(COMMANDS[name][0])
    entry: Callable[[Sequence[str]], int] = getattr(module, _ENTRY.get(name, "main"))
    return entry(rest)


if __name__ == "__main__":
    raise SystemExit(main())
