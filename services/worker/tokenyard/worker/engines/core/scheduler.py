"""Continuous batching for one rank (vLLM-style), synchronous; the engine loop drives it.

One step is one forward pass over every scheduled request, real (the CPU engine) or modelled
(the mocker):

1. The step's budget is ``max_num_batched_tokens`` tokens.
2. Running requests, oldest first, get ``min(remaining, budget)`` tokens each: one for a request
   that is decoding, a chunk for one still prefilling, so a long prompt spreads over several steps
   while the others keep decoding. When the pool cannot hold a request's next tokens, a running
   request is preempted (the newest under LIFO, the oldest under FIFO): its blocks go back (its
   computed full blocks stay cached), it returns to the front of the queue and later recomputes
   what the cache no longer has; if it was already scheduled in this step, its tokens go back to
   the budget.
3. If nobody was preempted, waiting requests are admitted (priority, then arrival) while the
   budget and ``max_num_seqs`` allow. An admitted request starts from the longest cached prefix of
   its sequence, or from KV imported from a prefill worker (at least its last token is computed,
   for the logits). A waiting request that does not fit stays queued and never preempts; without
   chunked prefill, neither does one whose prompt does not fit the rest of the budget.
4. After the forward pass (:meth:`Scheduler.finish_step`), the blocks each request completed are
   committed to the pool (and announced), and every request whose whole sequence is now computed
   takes the token sampled for it and is checked against its stop conditions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tokenyard.common.hashing import local_block_hashes, salt_hash, sequence_hashes
from tokenyard.worker.engines.base import EngineRequest, FinishReason, Usage
from tokenyard.worker.engines.core.block_pool import Block, BlockPool, BlockTable
from tokenyard.worker.engines.core.waiting import WaitingQueue


class PreemptionMode(StrEnum):
    LIFO = "lifo"
    FIFO = "fifo"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    """Longest sequence (prompt plus output) a request may reach."""
    eos_token_ids: tuple[int, ...] = ()
    enable_chunked_prefill: bool = True
    preemption_mode: PreemptionMode = PreemptionMode.LIFO


class SequenceState:
    """A request inside the engine: its tokens so far, its progress and its KV blocks."""

    def __init__(
        self, request: EngineRequest, order: int, block_size: int, max_tokens: int, sampler: Any
    ) -> None:
        self.request = request
        self.request_id = request.request_id
        self.order = order
        self.tokens: list[int] = list(request.token_ids)
        self.prompt_len = len(request.token_ids)
        self.max_tokens = max_tokens
        self.sampler = sampler
        """What the step executor samples this request with (a sampler, a seed); opaque here."""
        self.num_computed = 0
        self.table = BlockTable()
        self.cached_tokens: int | None = None
        self.num_preemptions = 0
        self.accepted_at = time.monotonic()
        self.scheduled_at: float | None = None
        self.finished = False
        self.guide: Any = None
        """The output constraint, advanced by the executor as each token is sampled; None: free."""
        self.imported: dict[int, bytes] | None = None
        """KV blocks computed elsewhere (a prefill worker), bytes by sequence hash (empty bytes for
        an engine without KV bytes), placed into the pool when the request is admitted: those
        that continue the prompt's cached prefix, in order."""
        self._block_size = block_size
        self._salt = salt_hash(request.lora_name or None, request.cache_salt or None)
        self.local_hashes: list[int] = []
        self.seq_hashes: list[int] = []

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    def hash_blocks(self, n_blocks: int) -> None:
        """Extend the block hashes to the first ``n_blocks`` full blocks of the sequence."""
        have = len(self.local_hashes)
        if n_blocks <= have:
            return
        bs = self._block_size
        new_local = local_block_hashes(self.tokens[have * bs : n_blocks * bs], bs, self._salt)
        self.local_hashes.extend(new_local)
        self.seq_hashes.extend(sequence_hashes(new_local, self.seq_hashes[-1] if self.seq_hashes else None))

    def usage(self) -> Usage:
        return Usage(self.prompt_len, self.num_output, self.cached_tokens or 0)


@dataclass(frozen=True, slots=True)
class Scheduled:
    """``length`` tokens of ``seq`` from position ``start`` are computed in this step."""

    seq: SequenceState
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """The step computes the sequence's last token, so its logits give the next one."""
        return self.start + self.length == len(self.seq.tokens)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens this step computes (0 for a decode)."""
        return max(0, min(self.start + self.length, self.seq.prompt_len) - self.start)


@dataclass(frozen=True, slots=True)
class TokenOutput:
    seq: SequenceState
    token_id: int
    finish_reason: FinishReason | None = None


KvWriter = Callable[[Block, bytes], None]


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        config: SchedulerConfig,
        *,
        kv_writer: KvWriter | None = None,
        steps_write_kv: bool = True,
    ) -> None:
        """``kv_writer`` puts imported KV bytes into a block; None for an engine without KV bytes
        (the simulated one), where imported blocks are only accounted for. ``steps_write_kv``:
        a step writes K and V into its blocks, so the blocks of a request aborted mid-step go back
        only after the step; without (the simulated engine) they go back at once."""
        self.pool = pool
        self.config = config
        self.block_size = pool.block_size
        self.eos_token_ids = frozenset(config.eos_token_ids)
        self.kv_writer = kv_writer
        self.steps_write_kv = steps_write_kv
        self.waiting: WaitingQueue[SequenceState] = WaitingQueue(lambda seq: seq.request.priority)
        self.running: list[SequenceState] = []
        self.requests: dict[str, SequenceState] = {}
        self.preempted: list[SequenceState] = []
        """Requests preempted by the latest :meth:`schedule`."""
        self._order = 0
        self._in_flight: list[Scheduled] | None = None
        self._deferred: list[SequenceState] = []

    # -- requests ---------------------------------------------------------------------------

    def check(self, request: EngineRequest) -> None:
        """Raise ValueError if this engine can never serve ``request``."""
        cfg = self.config
        n = len(request.token_ids)
        if not n:
            raise ValueError("the prompt must have at least one token")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.min_tokens < 0:
            raise ValueError(f"min_tokens must not be negative, got {request.min_tokens}")
        if n >= cfg.max_model_len:
            raise ValueError(
                f"prompt of {n} tokens leaves no room to generate: sequences are limited to "
                f"{cfg.max_model_len} tokens"
            )
        if not cfg.enable_chunked_prefill and n > cfg.max_num_batched_tokens:
            raise ValueError(
                f"prompt of {n} tokens exceeds max_num_batched_tokens ({cfg.max_num_batched_tokens}) "
                "and chunked prefill is off"
            )

    def add(self, request: EngineRequest, sampler: Any = None) -> SequenceState:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        self.check(request)
        room = self.config.max_model_len - len(request.token_ids)
        max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
        if request.prefill_only:
            max_tokens = 1
        seq = SequenceState(request, self._order, self.block_size, max_tokens, sampler)
        self._order += 1
        self.requests[request.request_id] = seq
        self.waiting.push_back(seq)
        return seq

    def abort(self, request_id: str) -> SequenceState | None:
        """Drop a request wherever it is; its blocks go back now, or after the step in flight
        (whose forward pass may still be writing them). None if it is not here."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        in_flight = self._in_flight is not None and any(s.seq is seq for s in self._in_flight)
        if in_flight and self.steps_write_kv:
            self._deferred.append(seq)
        else:
            self.pool.release(seq.table)
        return seq

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    @property
    def active_prefill_tokens(self) -> int:
        """Prompt tokens still to compute, over waiting and running requests."""
        return sum(max(0, s.prompt_len - s.num_computed) for s in self.requests.values())

    # -- the step ---------------------------------------------------------------------------

    def schedule(self) -> list[Scheduled]:
        """Pick this step's work and give it KV blocks. Every call must be followed by
        :meth:`finish_step` with the same list before the next one."""
        budget = self.config.max_num_batched_tokens
        plan: dict[SequenceState, Scheduled] = {}
        self.preempted = []
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            while not self.pool.allocate(seq.table, seq.num_computed + n):
                victim = self._victim()
                self._preempt(victim)
                undone = plan.pop(victim, None)
                if undone is not None:
                    budget += undone.length
                if victim is seq:
                    break
            else:
                plan[seq] = Scheduled(seq, seq.num_computed, n)
                budget -= n

        if not self.preempted:
            while len(self.running) < self.config.max_num_seqs and budget > 0:
                head = self.waiting.peek()
                if head is None:
                    break
                admitted = self._admit(head, budget)
                if admitted is None:
                    break
                plan[head] = admitted
                budget -= admitted.length

        scheduled = list(plan.values())
        now = time.monotonic()
        for work in scheduled:
            if work.seq.scheduled_at is None:
                work.seq.scheduled_at = now
        self._in_flight = scheduled
        return scheduled

    def _victim(self) -> SequenceState:
        return self.running[-1] if self.config.preemption_mode is PreemptionMode.LIFO else self.running[0]

    def _admit(self, seq: SequenceState, budget: int) -> Scheduled | None:
        bs = self.block_size
        seq_len = len(seq.tokens)
        # At least the last token is computed, so the cache can cover at most seq_len - 1.
        usable = (seq_len - 1) // bs
        seq.hash_blocks(usable)
        hashes = seq.seq_hashes[:usable]
        prefix = self.pool.match_prefix(hashes)
        imported = self._importable(seq, hashes, len(prefix))
        start = max(imported, len(prefix)) * bs
        prompt_left = seq.prompt_len - min(start, seq.prompt_len)
        if not self.config.enable_chunked_prefill and prompt_left > budget:
            return None
        n = min(seq_len - start, budget)
        if imported > len(prefix):
            assert seq.imported is not None
            data = seq.imported

            def fill(block: Block, i: int) -> None:
                if self.kv_writer is not None:
                    self.kv_writer(block, data[hashes[i]])

            if not self.pool.import_blocks(seq.table, hashes[:imported], seq.local_hashes[:imported], fill):
                return None
            if not self.pool.allocate(seq.table, start + n):
                self.pool.release(seq.table)
                return None
        elif not self.pool.allocate(seq.table, start + n, prefix):
            return None
        seq.imported = None
        seq.num_computed = start
        if seq.cached_tokens is None:
            seq.cached_tokens = min(start, seq.prompt_len)
        self.waiting.remove(seq)
        self.running.append(seq)
        return Scheduled(seq, start, n)

    @staticmethod
    def _importable(seq: SequenceState, hashes: list[int], cached: int) -> int:
        """How many leading blocks of ``hashes`` the cache (its first ``cached``) and the
        request's imported KV (the blocks right after) provide together; 0 without imported KV.
        The cached prefix may have shrunk since the blocks were fetched (an eviction): then the
        imported blocks past the gap are useless, and the rest of the prompt is computed here."""
        imported = seq.imported
        if not imported:
            return 0
        count = cached
        while count < len(hashes) and hashes[count] in imported:
            count += 1
        return count

    def _preempt(self, victim: SequenceState) -> None:
        self.running.remove(victim)
        self.pool.release(victim.table)
        victim.num_computed = 0
        victim.num_preemptions += 1
        self.waiting.push_front(victim)
        self.preempted.append(victim)

    def finish_step(self, scheduled: list[Scheduled], sampled: dict[SequenceState, int]) -> list[TokenOutput]:
        """Account for the forward pass of ``scheduled``: commit completed blocks, append each
        sampled token (``sampled`` has one per sequence whose work :attr:`~Scheduled.samples`),
        finish what is done. Sequences aborted meanwhile are skipped."""
        self._in_flight = None
        outputs: list[TokenOutput] = []
        for work in scheduled:
            seq = work.seq
            if seq.finished:
                continue
            seq.num_computed = work.start + work.length
            full = seq.num_computed // self.block_size
            seq.hash_blocks(full)
            self.pool.commit(seq.table, seq.num_computed, seq.seq_hashes, seq.local_hashes)
            token = sampled.get(seq)
            if token is not None:
                outputs.append(self._append(seq, token))
        for seq in self._deferred:
            self.pool.release(seq.table)
        self._deferred.clear()
        return outputs

    def abandon_step(self) -> None:
        """The step in flight will never finish (the engine is stopping): nothing it computed is
        committed, and the blocks of requests aborted meanwhile go back now."""
        self._in_flight = None
        for seq in self._deferred:
            self.pool.release(seq.table)
        self._deferred.clear()

    def _append(self, seq: SequenceState, token: int) -> TokenOutput:
        req = seq.request
        seq.tokens.append(token)
        produced = seq.num_output
        reason: FinishReason | None = None
        if produced >= req.min_tokens and (
            token in req.stop_token_ids or (not req.ignore_eos and token in self.eos_token_ids)
        ):
            reason = FinishReason.STOP
        elif produced >= seq.max_tokens or len(seq.tokens) >= self.config.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            # A prefill-only request's blocks stay with it: the engine holds them for the decode
            # worker that fetches them, or lets them go.
            self.finish(seq, keep_blocks=req.prefill_only)
        return TokenOutput(seq, token, reason)

    def finish(self, seq: SequenceState, *, keep_blocks: bool = False) -> None:
        """Take a finished sequence out; its blocks go back unless the caller keeps the table."""
        seq.finished = True
        self.running.remove(seq)
        del self.requests[seq.request_id]
        if not keep_blocks:
            self.pool.release(seq.table)
