"""Worker cost (in blocks) and selection among candidates.

For each eligible worker rank::

    raw_prefill  = (active_prefill_tokens + isl) / block_size
    decay        = 1 / (1 + credit_decay * ((prefill - min prefill over candidates) / block_size) / request_blocks)
    credit       = overlap_credit * decay * device_overlap
                   + host_weight * host_beyond_device + disk_weight * disk_beyond_host
                   + shared_multiplier * external_beyond_device
    cost         = prefill_load_scale * max(0, raw_prefill - credit)
                   + active_blocks + blocks of the prompt not already active there
                   + active_request_weight * active_requests

Pools (:meth:`CostKnobs.for_pool`): the prefill pool leaves decode blocks out (its requests never
decode there); the decode pool leaves prefill load out and credits cached blocks against the
decode term instead (``cost = max(0, decode - credit) + active_request_weight * requests``), so
that a decode worker already holding a prompt's prefix is preferred, as the reference does for
conditional disaggregation.

Lower cost wins. Lower tiers are credited only for the blocks beyond what a faster tier already
holds: a block cached on the device and also offloaded to host memory saves its prefill once.

Cache pressure (the ``kv`` mode; ``kv-classic`` is the formula above alone). Three more terms
come from :class:`tokenyard.router.index.recency.KeepForecast`, the router's forecast of what
each rank's cache will keep, and from the requests' expected output lengths::

    credit      uses device_overlap - doomed_overlap    (cached blocks evicted before this
                                                         request runs save nothing)
    decode      = decode_load_scale * (active_blocks + active output blocks
                                       + prompt blocks not active there + this request's output blocks)
    cost        += eviction_weight * evicted_hot_blocks (reused blocks this placement evicts)
                 + overflow_weight * max(0, blocks the rank's running requests and this one need
                                            - its KV capacity)

The last term keeps affinity from piling more running requests on a rank than its KV cache holds:
past that, a new request waits in the engine until a running one ends (or preempts one, which
computes its prompt again). Each request, active or new, also holds two blocks its chain does not
name: its prompt's partial last block and the one its output is written into.

So a prefix stays where its copy will survive, a new prefix goes where it evicts least, and a
hot prefix is copied to a second rank only when its home's load outweighs a full prefill there
plus what the copy evicts: replication on purpose, at the break-even point, not by drift.

Selection: at temperature 0 the minimum, ties broken uniformly at random (never by order, or the
first worker would take every tie); above 0, a softmax over min-max normalised costs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

# Blocks a request holds beyond its prompt's complete ones: the partial last one and the block
# its output goes into (the capacity check; more when it says how long its output is).
_PRIVATE_BLOCKS = 2


@dataclass(frozen=True, slots=True)
class CostKnobs:
    overlap_score_credit: float = 1.0
    credit_decay: float = 0.0
    prefill_load_scale: float = 1.0
    active_request_weight: float = 0.0
    host_cache_hit_weight: float = 0.75
    disk_cache_hit_weight: float = 0.25
    shared_cache_multiplier: float = 0.0
    temperature: float = 0.0
    track_prefill_tokens: bool = True
    track_active_blocks: bool = True
    # Credit cached blocks against the decode term (the decode pool, whose prefill is elsewhere).
    decode_credit: bool = False
    # Cache-pressure terms (the kv mode): weight of the decode term, and cost per reused block a
    # placement evicts.
    decode_load_scale: float = 1.0
    eviction_weight: float = 1.0
    overflow_weight: float = 8.0

    def for_pool(self, pool: str) -> CostKnobs:
        """These knobs for a request routed in ``pool`` (see the module's docstring)."""
        if pool == "prefill":
            return replace(self, track_active_blocks=False) if self.track_active_blocks else self
        if pool == "decode":
            return replace(self, track_prefill_tokens=False, decode_credit=True)
        return self

    def with_overrides(
        self,
        overlap_score_credit: float | None = None,
        prefill_load_scale: float | None = None,
        temperature: float | None = None,
    ) -> CostKnobs:
        """These knobs with a request's overrides (None keeps the configured value)."""
        if overlap_score_credit is None and prefill_load_scale is None and temperature is None:
            return self
        return replace(
            self,
            overlap_score_credit=self.overlap_score_credit
            if overlap_score_credit is None
            else overlap_score_credit,
            prefill_load_scale=self.prefill_load_scale if prefill_load_scale is None else prefill_load_scale,
            temperature=self.temperature if temperature is None else temperature,
        )


@dataclass(slots=True)
class RankState:
    """What the cost function knows about one candidate rank for one request."""

    active_prefill_tokens: float = 0.0
    active_blocks: float = 0.0
    active_requests: int = 0
    device_overlap: int = 0
    host_overlap: int = 0
    disk_overlap: int = 0
    external_overlap: int = 0
    # Leading prompt blocks already referenced by requests active there (they add no decode blocks).
    active_overlap: int = 0
    # Cache-pressure forecast (the kv mode; 0 elsewhere): blocks active requests are expected to
    # generate there, device_overlap blocks predicted evicted before this request runs, and reused
    # blocks this request's new blocks would evict.
    output_blocks: float = 0.0
    doomed_overlap: int = 0
    evicted_hot_blocks: float = 0.0
    # Device KV blocks of the rank (the kv mode; 0: unknown).
    capacity_blocks: int = 0


def costs(
    states: Sequence[RankState],
    isl_tokens: int,
    block_size: int,
    knobs: CostKnobs,
    *,
    pressure: bool = False,
    output_blocks: float = 0.0,
) -> list[float]:
    """The cost of each candidate for a prompt of ``isl_tokens`` tokens (``block_size`` per block);
    ``pressure`` adds the cache-pressure terms, ``output_blocks`` this request's expected output."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    request_blocks = -(-isl_tokens // block_size)
    track_prefill = knobs.track_prefill_tokens
    track_decode = knobs.track_active_blocks
    decode_credit = knobs.decode_credit and not track_prefill
    decay_on = track_prefill and knobs.credit_decay > 0 and request_blocks > 0
    min_prefill = min((s.active_prefill_tokens for s in states), default=0.0) if decay_on else 0.0
    # The knobs as locals: this loop runs for every candidate of every decision.
    credit_weight, credit_decay = knobs.overlap_score_credit, knobs.credit_decay
    host_w, disk_w = knobs.host_cache_hit_weight, knobs.disk_cache_hit_weight
    shared_w, prefill_w = knobs.shared_cache_multiplier, knobs.prefill_load_scale
    decode_w, eviction_w, overflow_w = knobs.decode_load_scale, knobs.eviction_weight, knobs.overflow_weight
    request_w = knobs.active_request_weight
    out: list[float] = []
    for s in states:
        device = s.device_overlap - s.doomed_overlap if pressure else s.device_overlap
        credit = credit_weight * device
        if decay_on:
            excess_blocks = (s.active_prefill_tokens - min_prefill) / block_size
            credit /= 1.0 + credit_decay * excess_blocks / request_blocks
        # Lower tiers count only beyond what a faster tier holds (rarely any: skip the sums).
        if s.host_overlap > device:
            credit += host_w * (s.host_overlap - device)
        if s.disk_overlap > device and s.disk_overlap > s.host_overlap:
            credit += disk_w * (s.disk_overlap - max(device, s.host_overlap))
        if s.external_overlap > device:
            credit += shared_w * (s.external_overlap - device)
        decode = 0.0
        new_blocks = request_blocks - s.active_overlap
        if new_blocks < 0:
            new_blocks = 0
        if track_decode:
            decode = s.active_blocks + new_blocks
            if pressure:
                decode = decode_w * (decode + s.output_blocks + output_blocks)
        if decode_credit:
            load = decode - credit if decode > credit else 0.0
        else:
            raw_prefill = (s.active_prefill_tokens + isl_tokens) / block_size if track_prefill else 0.0
            load = decode + (prefill_w * (raw_prefill - credit) if raw_prefill > credit else 0.0)
        if pressure:
            load += eviction_w * s.evicted_hot_blocks
            if s.capacity_blocks:
                load += overflow_w * overflow_blocks(s, request_blocks, output_blocks)
        if request_w:
            load += request_w * s.active_requests
        out.append(load)
    return out


def overflow_blocks(s: RankState, request_blocks: int, output_blocks: float) -> float:
    """KV blocks the rank's running requests and a new one of ``request_blocks`` prompt blocks
    (``output_blocks`` expected out) need beyond its capacity (0: they fit, or it is unknown).
    Past its capacity, an engine makes a new request wait until a running one ends (or preempts
    one, which computes its prompt again)."""
    if not s.capacity_blocks:
        return 0.0
    needed = (
        s.active_blocks
        + s.output_blocks
        + _PRIVATE_BLOCKS * (s.active_requests + 1)
        + max(0, request_blocks - s.active_overlap)
        + output_blocks
    )
    return needed - s.capacity_blocks if needed > s.capacity_blocks else 0.0


def select(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Index of the chosen candidate (``costs`` is not empty)."""
    if not costs:
        raise ValueError("nothing to select from")
    if temperature <= 0.0:
        return select_min(costs, rng)
    draw = rng.random()
    acc = 0.0
    probabilities = softmax_probabilities(costs, temperature)
    for i, p in enumerate(probabilities):
        acc += p
        if draw < acc:
            return i
    return len(costs) - 1


def select_min(values: Sequence[float], rng: random.Random) -> int:
    """Index of a minimum, uniformly at random among equal minima (reservoir sampling)."""
    best = 0
    best_value = values[0]
    ties = 1
    for i in range(1, len(values)):
        v = values[i]
        if v < best_value:
            best, best_value, ties = i, v, 1
        elif v == best_value:
            ties += 1
            if rng.randrange(ties) == 0:
                best = i
    return best


def softmax_probabilities(costs: Sequence[float], temperature: float) -> list[float]:
    """The selection probabilities :func:`select` draws from at ``temperature`` > 0."""
    lo, hi = min(costs), max(costs)
    span = hi - lo
    if span <= 0.0 or not math.isfinite(span):
        return [1.0 / len(costs)] * len(costs)
    weights = [math.exp(-((c - lo) / span) / temperature) for c in costs]
    total = sum(weights)
    return [w / total for w in weights]
