"""The GPU budget (``dynamo-behavior.md`` §5.6): replicas are fitted into ``[min - tolerance, max]``.

``max`` is a hard cap. Over it, both pools shrink in proportion (prefill first, decode takes
what is left), never below their minimums; when even the minimums do not fit, the answer is
zero replicas everywhere and a configuration error, since no count can honour both. Under the
floor (``min``, less a tolerance of one replica's GPUs when both bounds are set), the pools grow
in proportion, the mirror image. ``0`` disables a bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenyard.planner.pools import Pool


class BudgetError(ValueError):
    """The minimum replicas alone need more GPUs than the budget allows."""


@dataclass(frozen=True)
class Budget:
    max_gpus: int = 0
    min_gpus: int = 0
    gpus_per_replica: dict[Pool, int] = field(default_factory=dict)

    def gpus(self, pool: Pool) -> int:
        return self.gpus_per_replica.get(pool, 1)

    def total(self, replicas: dict[Pool, int]) -> int:
        return sum(n * self.gpus(pool) for pool, n in replicas.items())


@dataclass(frozen=True)
class Fitted:
    replicas: dict[Pool, int]
    changed: bool
    detail: str


def fit(replicas: dict[Pool, int], minimums: dict[Pool, int], budget: Budget) -> Fitted:
    """Fit ``replicas`` into the budget; raises :class:`BudgetError` when the minimums cannot fit."""
    total = budget.total(replicas)
    floor_total = budget.total({p: minimums.get(p, 0) for p in replicas})
    if budget.max_gpus and floor_total > budget.max_gpus:
        raise BudgetError(
            f"the minimum replicas need {floor_total} GPUs but the budget allows {budget.max_gpus}"
        )
    if budget.max_gpus and total > budget.max_gpus:
        fitted = _shrink(replicas, minimums, budget)
        return Fitted(fitted, True, f"{total} GPUs over the budget of {budget.max_gpus}: {_show(fitted)}")
    tolerance = max(budget.gpus(p) for p in replicas) if budget.max_gpus and budget.min_gpus else 0
    if budget.min_gpus and total < budget.min_gpus - tolerance:
        fitted = _grow(replicas, minimums, budget)
        return Fitted(fitted, True, f"{total} GPUs under the floor of {budget.min_gpus}: {_show(fitted)}")
    return Fitted(dict(replicas), False, "")


def _show(replicas: dict[Pool, int]) -> str:
    return ", ".join(f"{pool.value} {n}" for pool, n in replicas.items())


def _shrink(replicas: dict[Pool, int], minimums: dict[Pool, int], budget: Budget) -> dict[Pool, int]:
    cap = budget.max_gpus
    scale = cap / budget.total(replicas)
    pools = list(replicas)
    if len(pools) == 1:
        (pool,) = pools
        return {pool: max(minimums.get(pool, 0), cap // budget.gpus(pool))}
    first, second = pools  # prefill, decode
    g1, g2 = budget.gpus(first), budget.gpus(second)
    m1, m2 = minimums.get(first, 0), minimums.get(second, 0)
    n1 = max(m1, min((cap - m2 * g2) // g1, math.floor(replicas[first] * scale)))
    n2 = max(m2, (cap - n1 * g1) // g2)
    return {first: n1, second: n2}


def _grow(replicas: dict[Pool, int], minimums: dict[Pool, int], budget: Budget) -> dict[Pool, int]:
    floor = budget.min_gpus
    total = budget.total(replicas)
    pools = list(replicas)
    if len(pools) == 1:
        (pool,) = pools
        grown = max(replicas[pool], math.ceil(floor / budget.gpus(pool)))
        return {pool: _capped(grown, pool, budget)}
    first, second = pools
    g1, g2 = budget.gpus(first), budget.gpus(second)
    if total == 0:
        n1 = max(minimums.get(first, 0), 1)
    else:
        n1 = max(replicas[first], math.ceil(replicas[first] * floor / total))
    n2 = max(replicas[second], minimums.get(second, 0), math.ceil((floor - n1 * g1) / g2))
    return {first: n1, second: n2}


def _capped(n: int, pool: Pool, budget: Budget) -> int:
    return min(n, budget.max_gpus // budget.gpus(pool)) if budget.max_gpus else n
