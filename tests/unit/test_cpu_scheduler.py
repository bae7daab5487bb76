"""Continuous batching as the CPU engine configures it (LIFO preemption, chunked prefill, its
samplers), without a model: the forward pass is simulated by committing the scheduled tokens and
'sampling' a fixed token."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tokenyard.worker.engines.base import EngineRequest, FinishReason, SamplingParams
from tokenyard.worker.engines.core.block_pool import BlockPool
from tokenyard.worker.engines.core.scheduler import (
    PreemptionMode,
    Scheduled,
    Scheduler,
    SchedulerConfig,
    SequenceState,
    TokenOutput,
)
from tokenyard.worker.engines.cpu.sampling import Sampler

pytestmark = pytest.mark.unit

BS = 4
EOS = 2
NEXT = 7  # the token every simulated step samples


def make(num_blocks: int = 64, budget: int = 8, max_model_len: int = 64) -> Scheduler:
    return Scheduler(
        BlockPool(num_blocks, BS),
        SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            eos_token_ids=(EOS,),
            enable_chunked_prefill=True,
            preemption_mode=PreemptionMode.LIFO,
        ),
    )


def add(s: Scheduler, rid: str, prompt: Sequence[int], **kw: object) -> SequenceState:
    request = EngineRequest(rid, tuple(prompt), sampling=SamplingParams(temperature=0.0), **kw)  # type: ignore[arg-type]
    return s.add(request, Sampler.from_params(request.sampling, 0.0))


def step(s: Scheduler, token: int = NEXT) -> tuple[list[Scheduled], list[TokenOutput]]:
    plan = s.schedule()
    return plan, s.finish_step(plan, {w.seq: token for w in plan if w.samples})


def test_a_long_prompt_is_chunked_while_a_running_request_keeps_decoding() -> None:
    s = make(budget=8)
    short = add(s, "short", range(10, 13), max_tokens=10)
    step(s)  # short prefilled and sampled its first token
    long = add(s, "long", range(100, 120), max_tokens=1)
    shapes = []
    while long.request_id in s.requests:
        plan, _ = step(s)
        shapes.append({w.seq.request_id: w.length for w in plan})
    assert shapes == [{"short": 1, "long": 7}, {"short": 1, "long": 7}, {"short": 1, "long": 6}]
    assert long.output == [NEXT]
    assert short.num_output == 4


def test_an_admitted_request_starts_from_its_cached_prefix() -> None:
    s = make()
    first = add(s, "a", range(30), max_tokens=1)
    while s.has_work:
        step(s)
    assert first.cached_tokens == 0
    again = add(s, "b", range(30), max_tokens=1)
    plan, _ = step(s)
    # 7 full blocks cover 28 tokens; the last token of the prompt is always computed.
    assert (plan[0].start, again.cached_tokens) == (28, 28)
    exact = add(s, "c", range(28), max_tokens=1)
    plan, _ = step(s)
    assert (plan[0].start, exact.cached_tokens) == (24, 24)


def test_stop_conditions() -> None:
    s = make()
    cases = {
        "eos": (add(s, "eos", [1, 2, 3], max_tokens=5), EOS, FinishReason.STOP, 1),
        "ignore": (add(s, "ignore", [1, 2, 3], max_tokens=3, ignore_eos=True), EOS, FinishReason.LENGTH, 3),
        "stop": (add(s, "stop", [1, 2, 3], stop_token_ids=frozenset({NEXT})), NEXT, FinishReason.STOP, 1),
        "min": (add(s, "min", [1, 2, 3], max_tokens=9, min_tokens=2), EOS, FinishReason.STOP, 2),
    }
    ended: dict[str, tuple[FinishReason, int]] = {}
    while s.has_work:
        plan = s.schedule()
        sampled = {w.seq: cases[w.seq.request_id][1] for w in plan if w.samples}
        for out in s.finish_step(plan, sampled):
            if out.finish_reason is not None:
                ended[out.seq.request_id] = (out.finish_reason, out.seq.num_output)
    assert ended == {k: (v[2], v[3]) for k, v in cases.items()}


def test_the_context_length_caps_output_and_refuses_long_prompts() -> None:
    s = make(max_model_len=10)
    seq = add(s, "r", range(8))
    assert seq.max_tokens == 2
    with pytest.raises(ValueError, match="no room"):
        add(s, "too-long", range(10))
    # dp_rank is no longer the scheduler's to check (one scheduler per rank): the engine refuses
    # an out-of-range rank (InvalidArgument, test_mocker_engine.py).


def test_memory_pressure_preempts_the_newest_which_resumes_from_its_cache() -> None:
    s = make(num_blocks=6, budget=64)
    old = add(s, "old", range(100, 108), max_tokens=12, ignore_eos=True)
    new = add(s, "new", range(200, 208), max_tokens=12, ignore_eos=True)
    readmitted_from: list[int] = []
    while s.has_work:
        was_preempted = new.num_preemptions > 0 and new in s.waiting
        plan, _ = step(s)
        if s.preempted:
            assert s.preempted == [new]
        readmitted_from += [w.start for w in plan if w.seq is new and was_preempted]
    assert new.num_preemptions == 1 and old.num_preemptions == 0
    # Readmitted, it recomputes only what the cache lost meanwhile (its first block survived).
    assert readmitted_from == [4]
    assert (old.num_output, new.num_output) == (12, 12)
    assert s.pool.num_active_blocks == 0


def test_a_request_aborted_during_a_step_gives_its_blocks_back_after_it() -> None:
    s = make()
    add(s, "a", range(10), max_tokens=5)
    plan = s.schedule()
    held = s.pool.num_active_blocks
    assert s.abort("a") is not None
    assert s.pool.num_active_blocks == held  # the forward pass may still be writing them
    assert s.finish_step(plan, {w.seq: NEXT for w in plan}) == []
    assert s.pool.num_active_blocks == 0
    assert s.abort("a") is None


def test_priorities_admit_higher_classes_first() -> None:
    s = make(budget=4)
    add(s, "low", range(4), max_tokens=1)
    add(s, "high", range(10, 14), max_tokens=1, priority=5)
    plan, _ = step(s)
    assert [w.seq.request_id for w in plan] == ["high"]
