"""Worker: runs one engine (mocker, cpu, vllm) and serves generation, KV events, load and drain."""

from __future__ import annotations

from collections.abc import Sequence

from tokenyard.common.main import run_service
from tokenyard.worker.config import WorkerSettings
from tokenyard.worker.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(WorkerSettings, serve, argv, description=__doc__ or "")
