"""Planner: observes load and decides how many workers each pool needs."""

from __future__ import annotations

from collections.abc import Sequence

from tokenyard.common.main import run_service
from tokenyard.planner.config import PlannerSettings
from tokenyard.planner.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(PlannerSettings, serve, argv, description=__doc__ or "")
