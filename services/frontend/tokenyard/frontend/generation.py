"""What a generation request is and what comes back, independent of the surface that carried it.

The OpenAI and KServe surfaces translate their wire formats into a :class:`GenerationRequest`
and render the :class:`Delta` values the core yields; the clients translate the worker's and
router's protobufs into :class:`TokenChunk` and :class:`RouteDecision`. Nothing here knows a
wire format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from tokenyard.frontend.response_format import GuidedDecoding


class Endpoint(StrEnum):
    """Which surface a request came from (the ``endpoint`` label of the frontend metrics)."""

    CHAT_COMPLETIONS = "chat_completions"
    COMPLETIONS = "completions"
    RESPONSES = "responses"
    KSERVE_INFER = "kserve_infer"
    KSERVE_STREAM_INFER = "kserve_stream_infer"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    # The worker ended the request on its own account (a drain ran out of time).
    CANCELLED = "cancelled"
    # The engine gave up after streaming some tokens; the tokens sent stand.
    ERROR = "error"


class Outcome(Enum):
    """How a request ended, as the router is told (exactly once per request)."""

    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Sampling:
    """Absent values take the engine's defaults."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


@dataclass(frozen=True, slots=True)
class StopConditions:
    # None: up to the context length.
    max_tokens: int | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Applied by the frontend on the detokenized text; the matched string is not returned.
    stop_strings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One request as the core sees it. Exactly one of ``prompt``, ``prompt_token_ids`` and
    ``messages`` is set."""

    model: str
    endpoint: Endpoint
    stream: bool
    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    # Chat only: passed to the chat template.
    tools: Sequence[Mapping[str, Any]] | None = None
    # none | auto | required | function (then tool_choice_name names it).
    tool_choice: str = "auto"
    tool_choice_name: str | None = None
    # response_format: JSON the engine must constrain its output to.
    guided: GuidedDecoding | None = None
    template_kwargs: Mapping[str, Any] | None = None
    add_generation_prompt: bool = True
    sampling: Sampling = field(default_factory=Sampling)
    stop: StopConditions = field(default_factory=StopConditions)
    # Prepend the prompt text to the output (OpenAI completions ``echo``).
    echo: bool = False
    priority: int = 0
    lora_name: str = ""
    cache_salt: str = ""
    # Routing hints (``nvext``): the conversation this turn belongs to, and how many tokens the
    # caller expects it to generate.
    session_id: str = ""
    expected_output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


# Delta and TokenChunk are built once per token: not frozen, whose __init__ costs three times
# as much (object.__setattr__ per field). Nothing changes them after construction.
@dataclass(slots=True)
class Delta:
    """New output text. The last delta of a request has ``finish_reason`` and ``usage``."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class RouteDecision:
    worker_id: int
    dp_rank: int
    address: str
    cached_tokens: int
    # Leading prompt blocks predicted cached on the chosen rank.
    overlap_blocks: int = 0
    # The chosen rank's load before this request and its capacity (0: unknown), as the router saw
    # them: what conditional disaggregation decides on.
    active_prefill_tokens: int = 0
    active_decode_blocks: int = 0
    total_kv_blocks: int = 0
    max_num_batched_tokens: int = 0


@dataclass(frozen=True, slots=True)
class KvTransfer:
    """Where a decode worker pulls a prompt's KV from: what the prefill worker returned, passed to
    the decode worker unchanged."""

    source_worker_id: int
    source_dp_rank: int
    source_address: str
    transfer_id: str
    block_hashes: Sequence[int]
    num_tokens: int
    engine_params: bytes = b""


@dataclass(frozen=True, slots=True)
class WorkerRequest:
    """What the chosen worker is asked to generate."""

    request_id: str
    model: str
    token_ids: Sequence[int]
    sampling: Sampling
    stop: StopConditions
    priority: int = 0
    dp_rank: int | None = None
    lora_name: str = ""
    cache_salt: str = ""
    # Seconds left of the request's timeout (the call's deadline); None: no deadline.
    timeout: float | None = None
    # What the engine must constrain the output to; None: free text.
    guided: GuidedDecoding | None = None
    # Disaggregation: run the prompt only and hand its KV over (a prefill worker), or import the
    # prompt's KV from where a prefill worker left it (a decode worker).
    prefill_only: bool = False
    kv_transfer: KvTransfer | None = None


@dataclass(slots=True)
class TokenChunk:
    """Tokens from the worker since its previous chunk; the last chunk has ``finish_reason``."""

    token_ids: Sequence[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # A prefill-only request's last chunk: where its KV waits for the decode worker.
    kv_transfer: KvTransfer | None = None
