"""Worker: runs one engine (mocker, cpu, vllm) and serves generation, KV events, load and drain."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from tokenyard.common.main import Preload, run_service
from tokenyard.worker.config import WorkerSettings
from tokenyard.worker.engines.registry import preload_engine
from tokenyard.worker.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(WorkerSettings, serve, argv, description=__doc__ or "", respawn=respawn_preload)


def respawn_preload(settings: WorkerSettings) -> Preload | None:
    """With ``--respawn``: the template imports the engine's code before it forks the worker."""
    return partial(preload_engine, settings) if settings.respawn else None
