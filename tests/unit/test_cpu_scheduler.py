"""Continuous batching of the CPU engine without a model: the forward pass is simulated by
committing the scheduled tokens and 'sampling' a fixed token."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tokenyard.worker.engines.base import EngineRequest, FinishReason, SamplingParams
from tokenyard.worker.engines.cpu.kv_cache import KvGeometry, PagedKvCache
from tokenyard.worker.engines.cpu.sampling import Sampler
from tokenyard.worker.engines.cpu.scheduler import Scheduled, Scheduler, SequenceState, TokenOutput

pytestmark = pytest.mark.unit

BS = 4
EOS = 2
NEXT = 7  # the token every simulated step samples


def make(num_blocks: int = 64, budget: int = 8, max_model_len: int = 64) -> Scheduler:
    cache = PagedKvCache(num_blocks, KvGeometry(1, 1, 1, BS))
    return Scheduler(
        cache,
        max_num_seqs=8,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        eos_token_ids=(EOS,),
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
    with pytest.raises(ValueError, match="dp_rank"):
        add(s, "rank", range(3), dp_rank=1)


def test_memory_pressure_preempts_the_newest_which_resumes_from_its_cache() -> None:
    s = make(num_blocks=6, budget=64)
    old = add(s, "old", range(100, 108), max_tokens=12, ignore_eos=True)
    new = add(s, "new", range(200, 208), max_tokens=12, ignore_eos=True)
    preempted_once = False
    while s.has_work:
        step(s)
        preempted_once = preempted_once or new.num_preemptions > 0
    assert preempted_once and old.num_preemptions == 0
    assert (old.num_output, new.num_output) == (12, 12)
    assert s.cache.num_active_blocks == 0


def test_a_request_aborted_during_a_step_gives_its_blocks_back_after_it() -> None:
    s = make()
    add(s, "a", range(10), max_tokens=5)
    plan = s.schedule()
    held = s.cache.num_active_blocks
    assert s.abort("a") is not None
    assert s.cache.num_active_blocks == held  # the forward pass may still be writing them
    assert s.finish_step(plan, {w.seq: NEXT for w in plan}) == []
    assert s.cache.num_active_blocks == 0
    assert s.abort("a") is None


def test_priorities_admit_higher_classes_first() -> None:
    s = make(budget=4)
    add(s, "low", range(4), max_tokens=1)
    add(s, "high", range(10, 14), max_tokens=1, priority=5)
    plan, _ = step(s)
    assert [w.seq.request_id for w in plan] == ["high"]
