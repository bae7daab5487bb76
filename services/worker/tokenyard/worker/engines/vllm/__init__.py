"""vLLM's engine behind a worker (``--engine vllm``): vLLM's own scheduler, paged KV cache with
prefix caching and structured outputs, adapted to the engine protocol (``engine.py``), with its KV
events translated into Tokenyard's hashes (``kv_translate.py``).

Import from the submodules; this package imports vLLM only in :func:`create`, so that the worker's
settings (which include ``config``) load without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tokenyard.common.service import StartupError

if TYPE_CHECKING:
    from tokenyard.worker.config import WorkerSettings
    from tokenyard.worker.engines.base import Engine


def create(settings: WorkerSettings) -> Engine:
    """The vLLM engine of ``settings`` (not started); ImportError when vLLM is not installed."""
    if settings.role != "aggregated":
        raise StartupError(
            f"the vllm engine serves the aggregated role only for now, not {settings.role}; "
            "use --role aggregated, or --engine cpu for disaggregated serving (--role / TOKENYARD_WORKER_ROLE)"
        )
    # vLLM first: when it is missing, that is the package the error names (not one of its own
    # dependencies that the engine module imports too).
    importlib.import_module("vllm")
    from tokenyard.worker.engines.vllm.engine import VllmEngine

    return VllmEngine(settings.vllm)
