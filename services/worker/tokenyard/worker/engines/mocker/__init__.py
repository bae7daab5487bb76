"""The simulated engine: the shared batching core with a step executor that spends modelled time
(the reference timing model) and makes tokens up.

Import from the submodules; this package re-exports nothing, so that importing its configuration
(the worker's settings do) never pulls in the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenyard.worker.config import WorkerSettings
    from tokenyard.worker.engines.base import Engine


def create(settings: WorkerSettings) -> Engine:
    """The simulated engine of ``settings`` (not started)."""
    from tokenyard.common.service import StartupError
    from tokenyard.worker.engines.mocker.engine import MockerEngine

    try:
        return MockerEngine(settings.mocker, role=settings.role)
    except (OSError, ValueError) as exc:
        raise StartupError(
            f"cannot load the mocker perf model (--mocker-perf-model-path / "
            f"TOKENYARD_WORKER_MOCKER__PERF_MODEL_PATH): {exc}"
        ) from None


def preload(settings: WorkerSettings) -> None:
    """The engine's code, for a template process (``--respawn``)."""
    import tokenyard.worker.engines.mocker.engine  # noqa: F401
