"""gms: memory (weights, KV pools) that outlives the worker processes using it."""

from __future__ import annotations

from collections.abc import Sequence

from tokenyard.common.main import run_service
from tokenyard.gms.config import GmsSettings
from tokenyard.gms.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(GmsSettings, serve, argv, description=__doc__ or "")
