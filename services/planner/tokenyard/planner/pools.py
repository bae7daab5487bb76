"""Worker pools and the topologies the planner scales."""

from __future__ import annotations

from enum import StrEnum


class Pool(StrEnum):
    """A set of interchangeable workers, named after the role they register with."""

    AGGREGATED = "aggregated"
    PREFILL = "prefill"
    DECODE = "decode"


class Mode(StrEnum):
    """Which pools exist: an aggregated deployment scales as one pool, a split one as two."""

    AGGREGATED = "aggregated"
    DISAGGREGATED = "disaggregated"
    PREFILL = "prefill"
    DECODE = "decode"

    @property
    def pools(self) -> tuple[Pool, ...]:
        return _POOLS[self]


_POOLS: dict[Mode, tuple[Pool, ...]] = {
    Mode.AGGREGATED: (Pool.AGGREGATED,),
    Mode.DISAGGREGATED: (Pool.PREFILL, Pool.DECODE),
    Mode.PREFILL: (Pool.PREFILL,),
    Mode.DECODE: (Pool.DECODE,),
}
