"""The simulated engine: the batching core over the mocker's step executor.

It needs no model and follows the reference timing model, so it is the engine of every routing and
planning benchmark. KV transfer is simulated, not carried: a prefill-role mocker returns transfer
parameters naming the prompt's blocks after the modelled hand-off time, and a decode-role mocker
takes a request carrying them as if the prompt's KV had arrived: it charges no prefill time,
reports the prompt as cached, and announces the transferred blocks it stored with ``stored``
events, as a real decode worker does. There are no KV bytes, so the engine has no KV block export
or import (FetchKvBlocks answers UNIMPLEMENTED).
"""

from __future__ import annotations

from tokenyard.worker.engines.base import EngineRole
from tokenyard.worker.engines.core.engine import BatchingEngine
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.mocker.executor import MockerExecutor
from tokenyard.worker.engines.mocker.perf_model import PerfModel


class MockerEngine(BatchingEngine):
    """A simulated engine (not started); OSError or ValueError when the perf model cannot be read."""

    def __init__(
        self,
        config: MockerConfig | None = None,
        *,
        role: EngineRole = EngineRole.AGGREGATED,
        perf_model: PerfModel | None = None,
    ) -> None:
        self.mocker_config = config or MockerConfig()
        executor = MockerExecutor(self.mocker_config, role=role, perf_model=perf_model)
        super().__init__("mocker", executor, self.mocker_config.core_config(), role=role)
