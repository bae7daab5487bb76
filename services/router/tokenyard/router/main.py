"""Router: chooses a worker for every request, by KV cache overlap and load."""

from __future__ import annotations

from collections.abc import Sequence

from tokenyard.common.main import run_service
from tokenyard.router.config import RouterSettings
from tokenyard.router.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(RouterSettings, serve, argv, description=__doc__ or "")
