"""The real engine on the CPU: a Hugging Face causal LM (SmolLM2-135M-Instruct by default) run with
PyTorch, a paged KV cache with prefix caching, and continuous batching.

Import from the submodules; this package re-exports nothing, so that importing its configuration
(the worker's settings do) never pulls in PyTorch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenyard.worker.config import WorkerSettings
    from tokenyard.worker.engines.base import Engine


def create(settings: WorkerSettings) -> Engine:
    """The CPU engine of ``settings`` (not started); ImportError when PyTorch is missing."""
    from tokenyard.worker.engines.cpu.engine import CpuEngine

    return CpuEngine(settings.cpu, role=settings.role)


def preload(settings: WorkerSettings) -> None:
    """For a template process (``--respawn``): PyTorch, the engine, and what loading its weights
    will import (transformers and the model's class from disk; our own Llama from the gms)."""
    import tokenyard.worker.engines.cpu.engine  # noqa: F401
    from tokenyard.worker.engines.cpu.model import preload_loader

    preload_loader(settings.cpu)
