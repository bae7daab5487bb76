"""What an engine scheduled by Tokenyard supplies: its step executor.

The batching core (:mod:`~tokenyard.worker.engines.core.engine`) owns requests, scheduling, the
block pool and KV events; the executor owns only what differs between engines: loading (a model,
or a timing model), what a step costs and which tokens it produces (the simulated timing model, or
the torch forward pass and sampling), and, where it has them, KV bytes and output constraints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tokenyard.worker.engines.base import EngineRequest, GuidedKind, KvBlockLayout
from tokenyard.worker.engines.core.block_pool import Block, BlockPool
from tokenyard.worker.engines.core.scheduler import Scheduled, SequenceState


@dataclass(frozen=True, slots=True)
class ExecutorSpec:
    """What the executor knows once loaded; the engine sizes its pools and card from it."""

    num_blocks: int
    """KV blocks per rank."""
    context_length: int
    """Longest sequence (prompt plus output); never more than one rank's pool holds."""
    eos_token_ids: tuple[int, ...]


class StepExecutor(Protocol):
    async def load(self) -> ExecutorSpec:
        """Load what the steps need (weights, a timing model); raises on failure."""
        ...

    def bind(self, dp_rank: int, pool: BlockPool) -> None:
        """The pool of ``dp_rank``, whose block ids the executor's steps refer to."""
        ...

    def sampler(self, request: EngineRequest) -> Any:
        """Per-request sampling state kept on the sequence; ValueError for parameters it refuses."""
        ...

    async def execute(self, dp_rank: int, plan: Sequence[Scheduled]) -> dict[SequenceState, int]:
        """Run one step of ``plan`` (real or modelled time); the token of every scheduled request
        whose work :attr:`~Scheduled.samples`."""
        ...

    def finish_delay_s(self, seq: SequenceState) -> float:
        """Seconds a finished request's last chunk waits (a modelled KV hand-off); 0 for none."""
        ...

    def idle(self, dp_rank: int) -> None:
        """``dp_rank`` ran out of work: its next step begins when work arrives, not when its last
        step ended (an executor that keeps a clock of its own restarts it)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class KvBytes(Protocol):
    """An executor whose blocks hold real K and V, which can leave and enter the pool."""

    # A method, not a property: isinstance() on a runtime protocol reads every member, and this
    # one is only known once the executor is loaded.
    def block_bytes(self) -> int:
        """Bytes of one block's K and V, every layer."""
        ...

    def kv_layout(self) -> KvBlockLayout: ...

    def read_block(self, dp_rank: int, block: Block) -> bytes: ...

    def write_block(self, dp_rank: int, block: Block, data: bytes) -> None: ...


@runtime_checkable
class GuidedExecutor(Protocol):
    """An executor that constrains its output; the guide it returns rides on the sequence."""

    def guided_kinds(self) -> tuple[GuidedKind, ...]: ...

    def guide(self, request: EngineRequest) -> Any:
        """The request's constraint (None for a free request); ValueError for one it cannot compile."""
        ...
