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
