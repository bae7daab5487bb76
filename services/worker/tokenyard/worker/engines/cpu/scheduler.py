"""Continuous batching for the CPU engine (vLLM-style), synchronous; the engine drives it.

One step is one forward pass of the model over every scheduled request:

1. The step's budget is ``max_num_batched_tokens`` tokens.
2. Running requests, oldest first, get ``min(remaining, budget)`` tokens each: one for a request
   that is decoding, a chunk for one still prefilling, so a long prompt spreads over several steps
   while the others keep decoding. When the KV pool cannot hold a request's next tokens, the newest
   running request is preempted: its blocks go back (its computed full blocks stay cached), it
   returns to the front of the queue and later recomputes what the cache no longer has.
3. If nobody was preempted, waiting requests are admitted (priority, then arrival) while the
   budget and ``max_num_seqs`` allow. An admitted request starts from the longest cached prefix of
   its sequence (found by sequence hash; at least its last token is computed, for the logits).
4. After the forward pass (:meth:`Scheduler.finish_step`), the blocks each request completed are
   committed to the cache (and announced), and every request whose whole sequence is now computed
   takes the token sampled for it and is checked against its stop conditions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tokenyard.common.hashing import local_block_hashes, salt_hash, sequence_hashes
from tokenyard.worker.engines.base import EngineRequest, FinishReason, Usage
from tokenyard.worker.engines.core.waiting import WaitingQueue
from tokenyard.worker.engines.cpu.guided import JsonObjectGuide
from tokenyard.worker.engines.cpu.kv_cache import BlockTable, PagedKvCache
from tokenyard.worker.engines.cpu.sampling import Sampler


class SequenceState:
    """A request inside the engine: its tokens so far, its progress and its KV blocks."""

    def __init__(
        self, request: EngineRequest, order: int, block_size: int, max_tokens: int, sampler: Sampler
    ) -> None:
        self.request = request
        self.request_id = request.request_id
        self.order = order
        self.tokens: list[int] = list(request.token_ids)
        self.prompt_len = len(request.token_ids)
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.num_computed = 0
        self.table = BlockTable()
        self.cached_tokens: int | None = None
        self.num_preemptions = 0
        self.accepted_at = time.monotonic()
        self.scheduled_at: float | None = None
        self.finished = False
        self.guide: JsonObjectGuide | None = None
        """The output constraint, advanced by the runner as each token is sampled."""
        self.imported: tuple[tuple[int, bytes], ...] | None = None
        """KV blocks fetched from a prefill worker, ``(sequence hash, bytes)`` in prompt order,
        placed into the cache when the request is admitted."""
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


@dataclass(frozen=True, slots=True)
class TokenOutput:
    seq: SequenceState
    token_id: int
    finish_reason: FinishReason | None = None


class Scheduler:
    def __init__(
        self,
        cache: PagedKvCache,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: WaitingQueue[SequenceState] = WaitingQueue(lambda seq: seq.request.priority)
        self.running: list[SequenceState] = []
        self.requests: dict[str, SequenceState] = {}
        self._order = 0
        self._in_flight: list[Scheduled] | None = None
        self._deferred: list[SequenceState] = []

    # -- requests ---------------------------------------------------------------------------

    def check(self, request: EngineRequest) -> None:
        """Raise ValueError if this engine can never serve ``request``."""
        if not request.token_ids:
            raise ValueError("the prompt must have at least one token")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.min_tokens < 0:
            raise ValueError(f"min_tokens must not be negative, got {request.min_tokens}")
        if request.dp_rank not in (None, 0):
            raise ValueError(f"dp_rank {request.dp_rank} out of range: the engine has 1 rank")
        if len(request.token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(request.token_ids)} tokens leaves no room to generate: "
                f"sequences are limited to {self.max_model_len} tokens"
            )

    def add(self, request: EngineRequest, sampler: Sampler) -> SequenceState:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        self.check(request)
        room = self.max_model_len - len(request.token_ids)
        max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
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
        if self._in_flight is not None and any(s.seq is seq for s in self._in_flight):
            self._deferred.append(seq)
        else:
            self.cache.release(seq.table)
        return seq

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
        budget = self.max_num_batched_tokens
        plan: dict[SequenceState, Scheduled] = {}
        preempted = False
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            while not self.cache.allocate(seq.table, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                undone = plan.pop(victim, None)
                if undone is not None:
                    budget += undone.length
                if victim is seq:
                    break
            else:
                plan[seq] = Scheduled(seq, seq.num_computed, n)
                budget -= n

        if not preempted:
            while len(self.running) < self.max_num_seqs and budget > 0:
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

    def _admit(self, seq: SequenceState, budget: int) -> Scheduled | None:
        bs = self.block_size
        seq_len = len(seq.tokens)
        # At least the last token is computed, so the cache can cover at most seq_len - 1.
        usable = (seq_len - 1) // bs
        seq.hash_blocks(usable)
        hashes = seq.seq_hashes[:usable]
        prefix = self.cache.match_prefix(hashes)
        imported = self._importable(seq, hashes)
        if imported > len(prefix):
            assert seq.imported is not None
            data = [d for _, d in seq.imported[:imported]]
            if not self.cache.import_blocks(seq.table, hashes[:imported], seq.local_hashes[:imported], data):
                return None
            start = imported * bs
            n = min(seq_len - start, budget)
            if not self.cache.allocate(seq.table, start + n):
                self.cache.release(seq.table)
                return None
        else:
            start = len(prefix) * bs
            n = min(seq_len - start, budget)
            if not self.cache.allocate(seq.table, start + n, prefix):
                return None
        seq.imported = None
        seq.num_computed = start
        if seq.cached_tokens is None:
            seq.cached_tokens = min(start, seq.prompt_len)
        self.waiting.remove(seq)
        self.running.append(seq)
        return Scheduled(seq, start, n)

    @staticmethod
    def _importable(seq: SequenceState, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` the request's imported KV provides."""
        if not seq.imported:
            return 0
        count = 0
        for (h, _), mine in zip(seq.imported, hashes, strict=False):
            if h != mine:
                break
            count += 1
        return count

    def _preempt(self, victim: SequenceState) -> None:
        self.running.remove(victim)
        self.cache.release(victim.table)
        victim.num_computed = 0
        victim.num_preemptions += 1
        self.waiting.push_front(victim)

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
            self.cache.commit(seq.table, seq.num_computed, seq.seq_hashes, seq.local_hashes)
            token = sampled.get(seq)
            if token is not None:
                outputs.append(self._append(seq, token))
        for seq in self._deferred:
            self.cache.release(seq.table)
        self._deferred.clear()
        return outputs

    def _append(self, seq: SequenceState, token: int) -> TokenOutput:
        req = seq.request
        seq.tokens.append(token)
        produced = seq.num_output
        reason: FinishReason | None = None
        if produced >= req.min_tokens and (
            token in req.stop_token_ids or (not req.ignore_eos and token in self.eos_token_ids)
        ):
            reason = FinishReason.STOP
        elif produced >= seq.max_tokens or len(seq.tokens) >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            # A prefill-only request's blocks are held for the decode worker that will fetch them.
            self.finish(seq, keep_blocks=req.prefill_only)
        return TokenOutput(seq, token, reason)

    def finish(self, seq: SequenceState, *, keep_blocks: bool = False) -> None:
        """Take a finished sequence out; its blocks go back unless the caller keeps the table."""
        seq.finished = True
        self.running.remove(seq)
        del self.requests[seq.request_id]
        if not keep_blocks:
            self.cache.release(seq.table)
