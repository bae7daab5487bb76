"""The simulated engine: a vLLM-style scheduler and KV block manager that spend modelled time.

Import from the submodules (``tokenyard.worker.engines.mocker.engine`` and friends); this package
re-exports nothing so that importing its configuration never pulls in the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenyard.worker.config import WorkerSettings
    from tokenyard.worker.engines.base import Engine


def create(settings: WorkerSettings) -> Engine:
    """The simulated engine of ``settings`` (not started)."""
    from tokenyard.common.service import StartupError
    from tokenyard.worker.engines.mocker.adapter import MockerAdapter
    from tokenyard.worker.engines.mocker.config import EngineRole

    try:
        return MockerAdapter(settings.mocker, role=EngineRole(settings.role.value))
    except (OSError, ValueError) as exc:
        raise StartupError(
            f"cannot load the mocker perf model (--mocker-perf-model-path / "
            f"TOKENYARD_WORKER_MOCKER__PERF_MODEL_PATH): {exc}"
        ) from None
