"""Continuous batching for one data-parallel rank (vLLM-style), synchronous and deterministic.

One :meth:`Scheduler.step` is one engine forward pass:

1. The step's token budget is ``max_num_batched_tokens``.
2. Running requests, oldest first, get ``min(remaining, budget)`` tokens each (1 for a request
   that is decoding; a prompt may be split over steps when chunked prefill is on). If their KV
   blocks do not fit, running requests are preempted (newest first under LIFO, oldest first
   under FIFO): their blocks go back to the cache, their progress to zero, and they return to the
   front of the waiting queue; a preempted request that was already scheduled in this step gives
   its tokens back to the budget.
3. If nobody was preempted, waiting requests are admitted (highest priority first, first come
   first served within a priority) while ``max_num_seqs`` and the budget allow. A request's first
   schedule starts from its cached prefix (never the whole sequence: at least one token is
   computed). A waiting request that does not fit stays queued and never preempts.
4. Every running request whose whole sequence is now computed emits one token.

Its duration is ``prefill + decode`` model time: prefill over the requests that computed prompt
tokens (never on a decode-role engine, whose prompts arrive already computed), decode over the
requests that emitted a token (never on a prefill-role engine, which emits exactly one token).
The step returns model milliseconds; the caller decides how much wall-clock time that is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from tokenyard.common.hashing import local_block_hashes, salt_hash, sequence_hashes
from tokenyard.worker.engines.core.waiting import WaitingQueue
from tokenyard.worker.engines.mocker.block_manager import BlockTable, KvBlockManager, KvEventSink
from tokenyard.worker.engines.mocker.config import EngineRole, MockerConfig, PreemptionMode
from tokenyard.worker.engines.mocker.perf_model import PerfModel
from tokenyard.worker.engines.mocker.request import (
    FinishReason,
    MockerRequest,
    Usage,
    pseudo_token,
    request_seed,
)


class _Outcome(Enum):
    SCHEDULED = auto()
    BLOCKED = auto()
    CURRENT_PREEMPTED = auto()


class Sequence:
    """A request inside the scheduler: its tokens so far, its progress and its KV blocks."""

    def __init__(self, request: MockerRequest, order: int, block_size: int) -> None:
        self.request = request
        self.request_id = request.request_id
        self.order = order
        self.tokens: list[int] = list(request.token_ids)
        self.prompt_len = len(request.token_ids)
        self.num_computed = 0
        self.table = BlockTable()
        self.seed = request_seed(request.request_id, request.seed)
        self.cached_tokens: int | None = None
        self.num_preemptions = 0
        self._block_size = block_size
        self._salt = salt_hash(request.lora_name, request.cache_salt)
        self.local_hashes: list[int] = []
        self.seq_hashes: list[int] = []

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    def hash_blocks(self, n_blocks: int) -> None:
        """Extend the block hashes to the first ``n_blocks`` full blocks of the sequence."""
        have = len(self.local_hashes)
        if n_blocks <= have:
            return
        bs = self._block_size
        new_local = local_block_hashes(self.tokens[have * bs : n_blocks * bs], bs, self._salt)
        self.local_hashes.extend(new_local)
        self.seq_hashes.extend(sequence_hashes(new_local, self.seq_hashes[-1] if self.seq_hashes else None))


@dataclass(frozen=True, slots=True)
class TokenOutput:
    request_id: str
    token_id: int
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    """Set on the request's last token."""


@dataclass(frozen=True, slots=True)
class StepResult:
    prefill_ms: float
    """Model time of the prefill part, before any speedup."""
    decode_ms: float
    """Model time of the decode part, before any speedup."""
    scheduled_tokens: int
    """Tokens computed in this step; never more than ``max_num_batched_tokens``."""
    num_prefill_requests: int
    sum_prefill_tokens: int
    num_decode_requests: int
    sum_decode_kv_tokens: int
    """Total sequence length of the requests that emitted a token."""
    num_waiting: int
    num_running: int
    outputs: tuple[TokenOutput, ...] = ()
    preempted: tuple[str, ...] = ()

    @property
    def idle(self) -> bool:
        return self.scheduled_tokens == 0 and not self.outputs


@dataclass(slots=True)
class _Work:
    tokens: int
    prompt_tokens: int
    prompt_before: int


@dataclass(slots=True)
class _StepState:
    budget: int
    scheduled: dict[str, _Work] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        config: MockerConfig,
        perf_model: PerfModel,
        *,
        role: EngineRole = EngineRole.AGGREGATED,
        event_sink: KvEventSink | None = None,
    ) -> None:
        self.config = config
        self.perf_model = perf_model
        self.role = role
        self.blocks = KvBlockManager(
            config.num_gpu_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            sink=event_sink,
        )
        self.waiting: WaitingQueue[Sequence] = WaitingQueue(lambda seq: seq.request.priority)
        self.running: list[Sequence] = []
        self._requests: dict[str, Sequence] = {}
        self._order = 0

    # -- requests ---------------------------------------------------------------------------

    def check(self, request: MockerRequest) -> None:
        """Raise ValueError if this engine can never serve ``request``."""
        limit = self.config.max_sequence_len
        if len(request.token_ids) >= limit:
            raise ValueError(
                f"prompt of {len(request.token_ids)} tokens leaves no room to generate: "
                f"sequences are limited to {limit} tokens"
            )
        if (
            not self.config.enable_chunked_prefill
            and len(request.token_ids) > self.config.max_num_batched_tokens
        ):
            raise ValueError(
                f"prompt of {len(request.token_ids)} tokens exceeds max_num_batched_tokens "
                f"({self.config.max_num_batched_tokens}) and chunked prefill is off"
            )

    def add(self, request: MockerRequest) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        self.check(request)
        seq = Sequence(request, self._order, self.config.block_size)
        self._order += 1
        self._requests[request.request_id] = seq
        self.waiting.push_back(seq)

    def abort(self, request_id: str) -> Usage | None:
        """Drop a request wherever it is and free its blocks; its usage so far, None if it is not here."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return None
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)
        return Usage(seq.prompt_len, seq.num_output, seq.cached_tokens or 0)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def has_work(self) -> bool:
        return bool(self._requests)

    @property
    def active_prefill_tokens(self) -> int:
        """Prompt tokens still to compute, over waiting and running requests."""
        return sum(max(0, s.prompt_len - s.num_computed) for s in self._requests.values())

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> StepResult:
        state = _StepState(budget=self.config.max_num_batched_tokens)

        for seq in list(self.running):
            if state.budget <= 0:
                break
            if seq.request_id in state.preempted:  # preempted earlier in this step (a short list)
                continue
            if self._schedule(seq, state, from_waiting=False) is _Outcome.BLOCKED:
                break

        if not state.preempted:
            while len(self.running) < self.config.max_num_seqs and state.budget > 0:
                head = self.waiting.peek()
                if head is None or self._schedule(head, state, from_waiting=True) is not _Outcome.SCHEDULED:
                    break

        prefill_ms = self._prefill_ms(state)
        ready = [s for s in self.running if s.num_computed == len(s.tokens)]
        decode_ms = 0.0
        sum_decode_kv = sum(len(s.tokens) for s in ready)
        if ready and self.role is not EngineRole.PREFILL:
            decode_ms = self.perf_model.decode_ms(
                len(ready),
                self.blocks.num_active_blocks * self.config.block_size,
                sum_decode_kv / len(ready),
                self.config.num_gpu_blocks * self.config.block_size,
            )
        outputs = tuple(self._emit(seq) for seq in ready)
        prefills = [w for w in state.scheduled.values() if w.prompt_tokens > 0]
        return StepResult(
            prefill_ms=prefill_ms,
            decode_ms=decode_ms,
            scheduled_tokens=sum(w.tokens for w in state.scheduled.values()),
            num_prefill_requests=len(prefills),
            sum_prefill_tokens=sum(w.prompt_tokens for w in prefills),
            num_decode_requests=len(ready),
            sum_decode_kv_tokens=sum_decode_kv,
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            outputs=outputs,
            preempted=tuple(state.preempted),
        )

    def _schedule(self, seq: Sequence, state: _StepState, *, from_waiting: bool) -> _Outcome:
        bs = self.config.block_size
        seq_len = len(seq.tokens)
        cached = 0
        if seq.num_computed == 0:
            # At least the last token is always computed, so the cache can cover at most seq_len - 1.
            seq.hash_blocks((seq_len - 1) // bs)
            cached = self.blocks.prefix_hit_blocks(seq.seq_hashes[: (seq_len - 1) // bs]) * bs
        computed_before = seq.num_computed + cached
        prompt_before = min(computed_before, seq.prompt_len)
        prompt_remaining = seq.prompt_len - prompt_before
        if (
            prompt_remaining > 0
            and not self.config.enable_chunked_prefill
            and prompt_remaining > state.budget
        ):
            return _Outcome.BLOCKED
        n = min(seq_len - computed_before, state.budget)
        if n <= 0:
            return _Outcome.BLOCKED
        target = computed_before + n
        seq.hash_blocks(target // bs)
        while not self.blocks.allocate(seq.table, target, seq.seq_hashes, seq.local_hashes):
            if from_waiting:
                return _Outcome.BLOCKED
            victim = (
                self.running[-1] if self.config.preemption_mode is PreemptionMode.LIFO else self.running[0]
            )
            self._preempt(victim, state)
            if victim is seq:
                return _Outcome.CURRENT_PREEMPTED

        seq.num_computed = target
        if seq.cached_tokens is None:
            seq.cached_tokens = min(cached, seq.prompt_len)
        state.scheduled[seq.request_id] = _Work(n, min(target, seq.prompt_len) - prompt_before, prompt_before)
        state.budget -= n
        if from_waiting:
            self.waiting.remove(seq)
            self.running.append(seq)
        return _Outcome.SCHEDULED

    def _preempt(self, victim: Sequence, state: _StepState) -> None:
        self.running.remove(victim)
        self.blocks.free(victim.table)
        victim.num_computed = 0
        victim.num_preemptions += 1
        self.waiting.push_front(victim)
        undone = state.scheduled.pop(victim.request_id, None)
        if undone is not None:
            state.budget += undone.tokens
        state.preempted.append(victim.request_id)

    def _prefill_ms(self, state: _StepState) -> float:
        if self.role is EngineRole.DECODE:
            return 0.0
        prefills = [w for w in state.scheduled.values() if w.prompt_tokens > 0]
        if not prefills:
            return 0.0
        batch = len(prefills)
        mean_isl = sum(w.prompt_before + w.prompt_tokens for w in prefills) / batch
        mean_prefix = sum(w.prompt_before for w in prefills) / batch
        return self.perf_model.prefill_ms(batch, mean_isl, mean_prefix)

    def _emit(self, seq: Sequence) -> TokenOutput:
        req = seq.request
        token = pseudo_token(seq.seed, len(seq.tokens), self.config.vocab_size)
        seq.tokens.append(token)
        produced = seq.num_output
        reason: FinishReason | None = None
        eos = self.config.eos_token_id
        if produced >= req.min_tokens and (
            token in req.stop_token_ids or (not req.ignore_eos and eos is not None and token == eos)
        ):
            reason = FinishReason.STOP
        elif (
            produced >= req.max_tokens
            or self.role is EngineRole.PREFILL
            or len(seq.tokens) >= self.config.max_sequence_len
        ):
            reason = FinishReason.LENGTH
        if reason is None:
            return TokenOutput(seq.request_id, token)
        self.running.remove(seq)
        del self._requests[seq.request_id]
        self.blocks.free(seq.table)
        usage = Usage(seq.prompt_len, produced, seq.cached_tokens or 0)
        return TokenOutput(seq.request_id, token, reason, usage)
