"""The batching core's scheduler with the mocker's step executor, stepped by hand: chunking,
preemption, priorities, stops, roles."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from tokenyard.worker.engines.base import (
    EngineRequest,
    FinishReason,
    KvTransferParams,
    SamplingParams,
    Usage,
)
from tokenyard.worker.engines.core.scheduler import TokenOutput
from tokenyard.worker.engines.mocker.config import EngineRole, MockerConfig, PreemptionMode
from tokenyard.worker.engines.mocker.executor import (
    StepResult,
    pseudo_token,
    rank_by_hand,
    request_seed,
    step_by_hand,
)
from tokenyard.worker.engines.mocker.perf_model import PolynomialPerfModel

pytestmark = pytest.mark.unit

PERF = PolynomialPerfModel()


class Sim:
    """One rank of the simulated engine, built as the engine builds it, stepped synchronously."""

    def __init__(self, role: EngineRole = EngineRole.AGGREGATED, **overrides: Any) -> None:
        self.scheduler, self.executor = rank_by_hand(MockerConfig(**overrides), role=role, perf_model=PERF)
        self.pool = self.scheduler.pool

    def add(self, request_id: str, prompt: Iterable[int], *, seed: int | None = None, **kw: Any) -> None:
        request = EngineRequest(request_id, tuple(prompt), sampling=SamplingParams(seed=seed), **kw)
        self.scheduler.add(request, self.executor.sampler(request))

    def step(self) -> StepResult:
        return step_by_hand(self.scheduler, self.executor)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def waiting(self) -> list[str]:
        return [seq.request_id for seq in self.scheduler.waiting]

    @property
    def running(self) -> list[str]:
        return [seq.request_id for seq in self.scheduler.running]


def run(s: Sim, max_steps: int = 10_000) -> tuple[list[StepResult], dict[str, list[TokenOutput]]]:
    steps: list[StepResult] = []
    outputs: dict[str, list[TokenOutput]] = {}
    while s.has_work:
        assert len(steps) < max_steps
        steps.append(s.step())
        for out in steps[-1].outputs:
            outputs.setdefault(out.seq.request_id, []).append(out)
    return steps, outputs


def expected_tokens(
    request_id: str, prompt_len: int, n: int, vocab: int = 49152, seed: int | None = None
) -> list[int]:
    s = request_seed(request_id, seed)
    return [pseudo_token(s, prompt_len + k, vocab) for k in range(n)]


def test_chunked_prefill_splits_a_long_prompt_over_steps() -> None:
    s = Sim(max_num_batched_tokens=256)
    s.add("r", range(1000), max_tokens=3)
    steps, outputs = run(s)
    assert [st.scheduled_tokens for st in steps] == [256, 256, 256, 232, 1, 1]
    assert [len(st.outputs) for st in steps] == [0, 0, 0, 1, 1, 1]
    for k, st in enumerate(steps[:4]):
        chunk = min(256, 1000 - 256 * k)
        assert st.prefill_ms == pytest.approx(PERF.prefill_ms(1, 256 * k + chunk, 256 * k))
        assert st.sum_prefill_tokens == chunk
        assert st.num_prefill_requests == 1
    assert steps[0].decode_ms == 0.0
    assert steps[3].decode_ms > 0.0  # the step that finishes the prompt also emits the first token
    assert [st.num_decode_requests for st in steps] == [0, 0, 0, 1, 1, 1]
    assert [o.token_id for o in outputs["r"]] == expected_tokens("r", 1000, 3)
    assert outputs["r"][-1].finish_reason is FinishReason.LENGTH


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    s = Sim(max_num_batched_tokens=256, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="chunked prefill is off"):
        s.add("big", range(300), max_tokens=1)
    s.add("a", range(200), max_tokens=2)
    s.add("b", range(1000, 1200), max_tokens=1)
    first = s.step()
    assert first.scheduled_tokens == 200  # b does not fit the rest of the budget and is not split
    assert first.num_running == 1 and first.num_waiting == 1
    second = s.step()
    assert second.scheduled_tokens == 201  # a's decode token plus all of b


def test_budget_and_max_num_seqs_bound_a_step() -> None:
    s = Sim(max_num_batched_tokens=100, max_num_seqs=3)
    for i in range(5):
        s.add(f"r{i}", range(i * 1000, i * 1000 + 30), max_tokens=4)
    first = s.step()
    assert first.scheduled_tokens == 90 and first.num_running == 3 and first.num_waiting == 2
    steps, _ = run(s)
    assert all(st.scheduled_tokens <= 100 and st.num_running <= 3 for st in steps)


def preemption_setup(mode: PreemptionMode) -> Sim:
    # 6 blocks of 4 tokens; two 8-token prompts take 2 blocks each and grow one block per 4 tokens.
    s = Sim(block_size=4, num_gpu_blocks=6, preemption_mode=mode)
    s.add("old", range(8), max_tokens=12)
    s.add("new", range(100, 108), max_tokens=12)
    return s


@pytest.mark.parametrize(("mode", "victim"), [(PreemptionMode.LIFO, "new"), (PreemptionMode.FIFO, "old")])
def test_preemption_victim(mode: PreemptionMode, victim: str) -> None:
    s = preemption_setup(mode)
    tokens: dict[str, list[int]] = {"old": [], "new": []}
    step = s.step()
    while not step.preempted:
        for out in step.outputs:
            tokens[out.seq.request_id].append(out.token_id)
        step = s.step()
    assert step.preempted == (victim,)
    assert s.waiting == [victim]
    survivor = "old" if victim == "new" else "new"
    assert s.running == [survivor]
    for out in step.outputs:
        tokens[out.seq.request_id].append(out.token_id)
    _, outputs = run(s)
    # Preemption loses no tokens and changes none: the recomputed request continues where it was.
    for rid in ("old", "new"):
        assert tokens[rid] + [o.token_id for o in outputs[rid]] == expected_tokens(rid, 8, 12)
    assert s.pool.num_active_blocks == 0


def test_preempted_request_goes_to_the_front_and_admission_pauses() -> None:
    s = preemption_setup(PreemptionMode.LIFO)
    s.add("late", range(200, 204), max_tokens=1)
    step = s.step()
    while not step.preempted:
        step = s.step()
    assert s.waiting[0] == "new"
    assert "late" not in s.running


def test_a_step_that_preempted_admits_nobody() -> None:
    probe = preemption_setup(PreemptionMode.LIFO)
    steps_before = 0
    while not probe.step().preempted:
        steps_before += 1
    s = preemption_setup(PreemptionMode.LIFO)
    for _ in range(steps_before):
        s.step()
    s.add("tiny", [1], max_tokens=1)  # would fit: the victim's blocks are free again
    step = s.step()
    assert step.preempted == ("new",)
    assert s.running == ["old"] and s.waiting == ["new", "tiny"]
    assert s.pool.num_free_blocks >= 1


def test_priorities_then_arrival_order() -> None:
    s = Sim(max_num_seqs=1)
    for rid, priority in (("a", 0), ("b", 5), ("c", 5), ("d", 0), ("e", 9)):
        s.add(rid, [1, 2, 3], max_tokens=1, priority=priority)
    _, outputs = run(s)
    steps_order = list(outputs)
    assert steps_order == ["e", "b", "c", "a", "d"]


def test_stop_token_ends_the_request_unless_before_min_tokens() -> None:
    vocab = 3
    tokens = expected_tokens("r", 4, 40, vocab)
    stop = tokens[0]
    later = next(k for k in range(3, 40) if tokens[k] == stop)  # first stop at or after the 4th token
    s = Sim(vocab_size=vocab)
    s.add("r", [1, 2, 3, 4], max_tokens=40, stop_token_ids=frozenset({stop}))
    _, outputs = run(s)
    assert [o.token_id for o in outputs["r"]] == tokens[:1]
    assert outputs["r"][-1].finish_reason is FinishReason.STOP
    s.add("r", [1, 2, 3, 4], max_tokens=40, min_tokens=4, stop_token_ids=frozenset({stop}))
    _, outputs = run(s)
    assert [o.token_id for o in outputs["r"]] == tokens[: later + 1]
    assert outputs["r"][-1].finish_reason is FinishReason.STOP
    usage = outputs["r"][-1].seq.usage()
    assert usage.completion_tokens == later + 1 and usage.prompt_tokens == 4


def test_eos_stops_unless_ignored() -> None:
    vocab, eos = 4, 1
    tokens = expected_tokens("r", 3, 30, vocab)
    first_eos = tokens.index(eos)
    s = Sim(vocab_size=vocab, eos_token_id=eos)
    s.add("r", [7, 8, 9], max_tokens=30)
    _, outputs = run(s)
    assert len(outputs["r"]) == first_eos + 1
    assert outputs["r"][-1].finish_reason is FinishReason.STOP
    s.add("r", [7, 8, 9], max_tokens=30, ignore_eos=True)
    _, outputs = run(s)
    assert [o.token_id for o in outputs["r"]] == tokens
    assert outputs["r"][-1].finish_reason is FinishReason.LENGTH


def test_pseudo_tokens_are_deterministic_and_continue_across_migration() -> None:
    s = Sim()
    s.add("a", range(50), max_tokens=10, seed=7)
    s.add("b", range(50), max_tokens=10, seed=7)
    s.add("c", range(50), max_tokens=10, seed=8)
    _, outputs = run(s)
    full = [o.token_id for o in outputs["a"]]
    assert full == [o.token_id for o in outputs["b"]] == expected_tokens("a", 50, 10, seed=7)
    assert full != [o.token_id for o in outputs["c"]]
    # A continued request: the tokens so far appended to the prompt, the same seed.
    s.add("a2", [*range(50), *full[:4]], max_tokens=6, seed=7)
    _, outputs = run(s)
    assert [o.token_id for o in outputs["a2"]] == full[4:]


def test_first_schedule_starts_from_the_cached_prefix() -> None:
    s = Sim()
    s.add("warm", range(300), max_tokens=1)
    run(s)
    s.add("hit", range(300), max_tokens=2)
    steps, outputs = run(s)
    assert steps[0].prefill_ms == pytest.approx(PERF.prefill_ms(1, 300, 256))
    assert steps[0].scheduled_tokens == 44
    assert outputs["hit"][-1].seq.usage().cached_tokens == 256
    # A prompt that is exactly cached still computes its last block.
    s.add("x", range(256), max_tokens=1)
    run(s)
    s.add("y", range(256), max_tokens=1)
    _, outputs = run(s)
    assert outputs["y"][-1].seq.usage().cached_tokens == 192


def test_prefill_role_emits_one_token_and_charges_no_decode() -> None:
    s = Sim(EngineRole.PREFILL)
    # The engine turns every request of a prefill worker into a prefill-only one.
    s.add("p", range(500), max_tokens=50, prefill_only=True)
    steps, outputs = run(s)
    assert len(steps) == 1
    assert steps[0].decode_ms == 0.0 and steps[0].prefill_ms == pytest.approx(PERF.prefill_ms(1, 500, 0))
    assert len(outputs["p"]) == 1 and outputs["p"][0].finish_reason is FinishReason.LENGTH
    # New: a prefill-only request's blocks stay with it, for the engine to hand over, then release.
    seq = outputs["p"][0].seq
    assert s.pool.num_active_blocks == len(seq.table.blocks) == 8
    s.pool.release(seq.table)
    assert s.pool.num_active_blocks == 0


def test_decode_role_charges_no_prefill() -> None:
    s = Sim(EngineRole.DECODE)
    # The prompt was computed by a prefill worker (a decode worker that computes one itself pays).
    transfer = KvTransferParams(1, 0, "127.0.0.1:1", "d", (), 500)
    s.add("d", range(500), max_tokens=5, kv_transfer=transfer)
    steps, outputs = run(s)
    assert all(st.prefill_ms == 0.0 for st in steps)
    assert all(st.decode_ms > 0.0 for st in steps)
    assert len(outputs["d"]) == 5


def test_sequence_limit_ends_with_length_and_rejects_prompts_without_room() -> None:
    s = Sim(max_model_len=20)
    with pytest.raises(ValueError, match="no room"):
        s.add("long", range(20), max_tokens=1)
    s.add("r", range(15), max_tokens=100)
    _, outputs = run(s)
    assert len(outputs["r"]) == 5 and outputs["r"][-1].finish_reason is FinishReason.LENGTH
    s.add("q", [1], max_tokens=1)
    with pytest.raises(ValueError, match="already"):
        s.add("q", [1], max_tokens=1)


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    s = Sim(block_size=4, num_gpu_blocks=64, max_num_seqs=1)
    s.add("run", range(40), max_tokens=100)
    s.add("wait", range(100, 140), max_tokens=100)
    s.step()
    assert s.pool.num_active_blocks > 0
    # abort now returns the request's state, whose usage is what the old abort returned.
    waiting = s.scheduler.abort("wait")
    assert waiting is not None and waiting.usage() == Usage(40, 0, 0)
    running = s.scheduler.abort("run")
    assert running is not None and running.usage() == Usage(40, 1, 0)
    assert s.scheduler.abort("run") is None
    assert s.pool.num_active_blocks == 0
    # num_free_blocks now counts the evictable inactive blocks too.
    assert s.pool.num_free_blocks == 64
    assert s.pool.num_inactive_blocks == 10  # run's computed prompt blocks stay cached
    assert not s.has_work
