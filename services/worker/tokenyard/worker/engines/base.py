"""The seam between a worker and the engine behind it: domain types, the core protocol, capabilities.

Everything here is a plain domain type: the servicer translates protobuf to and from these, and
an engine never sees a ``*_pb2`` message. Engines report failures with the domain errors of
:mod:`tokenyard.common.errors`, which reach the client as gRPC status codes:

* ``InvalidArgument`` - a request this engine can never serve (prompt too long, bad dp_rank, a
  guided decoding kind it does not honour, ...);
* ``AlreadyExists`` - a request id that is already running here;
* ``Unavailable`` - the engine is not running, or failed before the request produced a token;

Listeners passed to ``subscribe_*`` are called synchronously from the engine's own loop, in order;
they must be quick and must not raise.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from tokenyard.worker.kv_events import KvEventListener, KvStored


class EngineRole(StrEnum):
    """What a worker's engine does with requests (the worker's ``--role``)."""

    AGGREGATED = "aggregated"
    PREFILL = "prefill"
    """Computes prompts and hands their KV over: one output token, then transfer parameters."""
    DECODE = "decode"
    """Continues requests whose prompt KV was computed by a prefill worker."""


class FinishReason(StrEnum):
    STOP = "stop"
    """An end-of-sequence or stop token."""
    LENGTH = "length"
    """``max_tokens`` reached, or the context length."""
    CANCELLED = "cancelled"
    """Ended by the worker (``abort``), e.g. when a drain's grace period ran out."""
    ERROR = "error"
    """The engine gave up on the request after it had produced tokens."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """None takes the engine's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class GuidedKind(StrEnum):
    """What a guided request's output must be."""

    JSON_OBJECT = "json_object"
    """One syntactically valid JSON object (RFC 8259), then end of sequence."""
    JSON_SCHEMA = "json_schema"
    """One JSON object valid against a JSON Schema, then end of sequence."""


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    kind: GuidedKind
    json_schema: str = ""
    """The serialized schema; set exactly when ``kind`` is ``json_schema``."""


@dataclass(frozen=True, slots=True)
class KvTransferParams:
    """Where a decode worker pulls a prompt's KV from (disaggregated serving)."""

    source_worker_id: int
    source_dp_rank: int
    source_address: str
    transfer_id: str
    block_hashes: tuple[int, ...]
    """Sequence hashes of the prompt's complete blocks, in prompt order."""
    num_tokens: int
    engine_params: bytes = b""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    token_ids: tuple[int, ...]
    max_tokens: int | None = None
    """None: up to the context length."""
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    dp_rank: int | None = None
    lora_name: str = ""
    cache_salt: str = ""
    prefill_only: bool = False
    kv_transfer: KvTransferParams | None = None
    """Decode side: import the prompt's KV from here instead of computing it."""
    annotations: Mapping[str, str] = field(default_factory=dict)
    guided: GuidedDecoding | None = None
    """None: the output is unconstrained."""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens the engine did not compute: prefix-cache hits plus imported KV."""


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """Every token ready since the previous chunk; the last chunk also says how the request ended."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    queued_s: float | None = None
    """Last chunk: seconds from acceptance until first scheduled; None if the engine does not know."""
    kv_transfer: KvTransferParams | None = None
    """Last chunk of a prefill-only request: what a decode worker needs (source fields left empty
    for the worker to fill in)."""

    @property
    def last(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class RankLoad:
    dp_rank: int
    active_blocks: int
    total_blocks: int
    waiting: int
    running: int
    active_prefill_tokens: int
    timestamp_unix_ns: int


@dataclass(frozen=True, slots=True)
class KvSnapshot:
    """One rank's whole cache: applying ``chains`` in order to an empty index reproduces the
    rank's index after every event with id < ``next_event_id``. Parents come before children."""

    dp_rank: int
    next_event_id: int
    chains: tuple[KvStored, ...]


@dataclass(frozen=True, slots=True)
class StepRequests:
    num_prefill_requests: int = 0
    sum_prefill_tokens: int = 0
    var_prefill_length: float = 0.0
    sum_prefill_kv_tokens: int = 0
    num_decode_requests: int = 0
    sum_decode_kv_tokens: int = 0
    var_decode_kv_tokens: float = 0.0


@dataclass(frozen=True, slots=True)
class StepMetrics:
    """One engine iteration of one rank."""

    dp_rank: int
    wall_time_s: float
    scheduled: StepRequests
    queued: StepRequests
    timestamp_unix_ns: int


StepListener = Callable[[StepMetrics], None]


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the engine knows about itself once started; the model card is built from it."""

    kind: str
    dp_size: int
    block_size: int
    context_length: int
    total_kv_blocks: int
    """Device KV pool per rank, in blocks."""
    max_num_seqs: int
    max_num_batched_tokens: int
    eos_token_ids: tuple[int, ...]
    publishes_kv_events: bool


@dataclass(frozen=True, slots=True)
class KvBlockLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    layout_hash: int


@dataclass(frozen=True, slots=True)
class KvBlockExport:
    layout: KvBlockLayout
    blocks: tuple[tuple[int, bytes], ...]
    """(sequence hash, K and V of every layer) per block, in the requested order."""


@dataclass(frozen=True, slots=True)
class KvTransferStats:
    """The prefill side of KV transfer, for the worker's metrics."""

    held_transfers: int
    """Transfers whose blocks are held now, waiting for a decode worker to fetch them."""
    held_blocks: int
    expired_transfers: int
    """Transfers dropped by the hold timeout since the engine was created (never fetched and released)."""


class Engine(Protocol):
    """What every engine does. Optional abilities are the capability protocols below, which the
    worker checks for with ``isinstance``; an engine simply leaves out what it cannot do."""

    kind: str
    """The engine's registry name (``mocker``, ``cpu``, ``vllm``); shown in the model card."""

    async def start(self) -> None:
        """Load the model and start serving; raises on failure (StartupError or Unavailable with a
        message that names what to fix)."""
        ...

    async def stop(self) -> None:
        """Stop; requests still in flight end with ``cancelled``."""
        ...

    def info(self) -> EngineInfo:
        """Geometry and limits, from which the model card is built; valid once :meth:`start` returned."""
        ...

    def generate(self, request: EngineRequest) -> AsyncGenerator[GenerateChunk, None]:
        """Stream the request's tokens. Closing the iterator (or cancelling its consumer) aborts
        the request and frees its KV blocks. The worker has validated the request against
        :meth:`info` (context length, dp_rank, sampling ranges, guided kinds) before calling."""
        ...

    def abort(self, request_id: str) -> bool:
        """End a running request now; its stream ends with ``cancelled``. False if unknown."""
        ...

    def load(self) -> tuple[RankLoad, ...]:
        """One entry per rank, by dp_rank."""
        ...

    def subscribe_kv_events(self, listener: KvEventListener) -> Callable[[], None]:
        """Call ``listener`` for every later KV event of every rank; returns the unsubscribe function.
        Subscribing before :meth:`start` sees every event from id 0. An engine that publishes no
        events (``info().publishes_kv_events`` false) never calls it."""
        ...

    def kv_snapshot(self, dp_rank: int) -> KvSnapshot:
        """The rank's cache now, consistent with the events published so far."""
        ...


@runtime_checkable
class StepMetricsSource(Protocol):
    """Capability: per-step metrics (the planner's load-based regressions feed on them)."""

    def subscribe_steps(self, listener: StepListener) -> Callable[[], None]:
        """Call ``listener`` after every engine step that did work; returns the unsubscribe function."""
        ...


@runtime_checkable
class KvBlockTransfer(Protocol):
    """Capability: KV blocks with real bytes leave and enter the engine (disaggregated serving).

    Prefill side: a prefill-only request's prompt blocks are held under its transfer id until a
    decode worker fetched them with ``release`` (or the engine's hold timeout drops them). Decode
    side: the worker fetches the blocks a request's ``kv_transfer`` names, imports them, then
    calls :meth:`Engine.generate` with that request, which starts from them."""

    async def export_kv_blocks(self, transfer_id: str, block_hashes: Sequence[int]) -> KvBlockExport:
        """The bytes of blocks held for a transfer (all of them when ``block_hashes`` is empty).
        Raises NotFound, naming the transfer, when it or a block is no longer held."""
        ...

    async def release_kv_transfer(self, transfer_id: str) -> None:
        """Let go of the blocks held for a transfer."""
        ...

    async def import_kv_blocks(self, params: KvTransferParams, blocks: KvBlockExport) -> None:
        """Keep blocks fetched from a prefill worker for the request whose ``kv_transfer`` is
        ``params``; they enter the cache (and are announced with ``stored``) when it is admitted.
        ``blocks`` may be any subset of the transfer's: the request starts from the longest
        prefix of its prompt that the cache and the imported blocks cover together. Raises
        InvalidArgument for a layout or block size this engine cannot take."""
        ...

    def kv_layout(self) -> KvBlockLayout:
        """The layout of this engine's blocks; fetched blocks must have exactly this one."""
        ...

    def kv_block_bytes(self) -> int:
        """Bytes of one block in :meth:`kv_layout`."""
        ...

    def cached_kv_prefix(self, block_hashes: Sequence[int], dp_rank: int | None) -> int:
        """How many leading blocks of the chain ``block_hashes`` the cache of ``dp_rank`` (None:
        the rank the engine would pick) holds now: those need not be fetched."""
        ...

    def kv_transfer_stats(self) -> KvTransferStats: ...


@runtime_checkable
class GuidedDecoder(Protocol):
    """Capability: the engine constrains its output (structured output). The kinds it honours are
    what :meth:`guided_kinds` returns (the model card lists them), and the worker refuses every
    other kind, and every kind for an engine without this capability, before the engine sees it."""

    def guided_kinds(self) -> tuple[GuidedKind, ...]:
        """The kinds this engine honours now (after :meth:`Engine.start`)."""
        ...
