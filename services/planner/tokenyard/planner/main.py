"""Planner: observes load and decides how many workers each pool needs.

`tokenyard planner dry-run --help` replays a trace offline instead of serving.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tokenyard.common.main import run_service
from tokenyard.planner.config import PlannerSettings
from tokenyard.planner.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "dry-run":
        from tokenyard.planner.dry_run import main as dry_run

        return dry_run(args[1:])
    return run_service(PlannerSettings, serve, args, description=__doc__ or "")
