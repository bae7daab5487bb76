"""The CPU engine: the shared batching core over the torch forward pass, with KV transfer.

A real model (SmolLM2-135M-Instruct by default) with a paged prefix KV cache and continuous
batching; everything but the step itself (scheduling, the block pool, KV events, prefill hand-off)
is the batching core's (:mod:`tokenyard.worker.engines.core.engine`).
"""

from __future__ import annotations

from tokenyard.worker.engines.base import EngineRole
from tokenyard.worker.engines.core.engine import KvTransferEngine
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.executor import CpuExecutor, default_num_threads
from tokenyard.worker.engines.cpu.model import LoadedModel

__all__ = ["CpuEngine", "default_num_threads"]


class CpuEngine(KvTransferEngine):
    def __init__(
        self,
        config: CpuEngineConfig | None = None,
        *,
        model: LoadedModel | None = None,
        role: EngineRole = EngineRole.AGGREGATED,
    ) -> None:
        """``model``: weights loaded already; the engine switches it to paged attention, so it must
        not be shared with other users."""
        self.cpu = CpuExecutor(config or CpuEngineConfig(), model=model)
        super().__init__("cpu", self.cpu, self.cpu.config.core_config(), role=role)
