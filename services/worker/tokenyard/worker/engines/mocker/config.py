"""Knobs of the simulated engine. Defaults follow the reference mocker (vLLM-style)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tokenyard.worker.engines.base import EngineRole
from tokenyard.worker.engines.core.engine import CoreConfig
from tokenyard.worker.engines.core.scheduler import PreemptionMode

__all__ = ["EngineRole", "MockerConfig", "PreemptionMode"]


class MockerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_gpu_blocks: int = Field(default=16384, ge=1, description="KV cache blocks per data-parallel rank.")
    block_size: int = Field(default=64, ge=1, le=4096, description="Tokens per KV block.")
    max_num_seqs: int = Field(default=256, ge=1, description="Most requests running at once per rank.")
    max_num_batched_tokens: int = Field(
        default=8192, ge=1, description="Token budget of one engine step (prefill chunks plus decodes)."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=2,
        description="Longest prompt plus output in tokens; unset means only the KV capacity limits it.",
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse cached KV blocks across requests and publish KV events."
    )
    enable_chunked_prefill: bool = Field(
        default=True, description="Split prompts longer than the step budget over several steps."
    )
    preemption_mode: PreemptionMode = Field(
        default=PreemptionMode.LIFO,
        description="Which running request gives its blocks up under memory pressure: lifo (newest) or fifo.",
    )
    speedup_ratio: float = Field(
        default=1.0,
        ge=0.0,
        description="Divides every simulated step time; 0 means never sleep (run as fast as possible).",
    )
    decode_speedup_ratio: float = Field(
        default=1.0,
        ge=0.0,
        description="Further divides decode time (on top of speedup_ratio); 0 means decode never sleeps.",
    )
    dp_size: int = Field(
        default=1, ge=1, le=1024, description="Data-parallel ranks, each with its own scheduler and KV cache."
    )
    perf_model_path: Path | None = Field(
        default=None,
        description="Profile (NPZ or JSON) to interpolate step times from; unset uses the polynomial model.",
    )
    vocab_size: int = Field(
        default=49152,
        ge=2,
        description="Pseudo tokens are drawn from [0, vocab_size) (SmolLM2's vocabulary).",
    )
    eos_token_id: int | None = Field(
        default=None,
        ge=0,
        description="Token that ends a request unless it asks to ignore EOS; unset means none does.",
    )
    kv_transfer_bandwidth_gbps: float = Field(
        default=64.0,
        ge=0.0,
        description="GB/s of the simulated KV hand-off of a prefill-only request to its decode worker, "
        "charged before its one token is released; 0 disables the delay.",
    )
    kv_bytes_per_token: int = Field(
        default=0,
        ge=0,
        description="KV bytes per prompt token of the simulated hand-off (layers*2*kv_heads*head_dim*dtype "
        "bytes); 0 disables the delay.",
    )

    @property
    def max_sequence_len(self) -> int:
        """Longest sequence a rank can hold: the model limit, and never more than the whole cache."""
        capacity = self.num_gpu_blocks * self.block_size
        return capacity if self.max_model_len is None else min(self.max_model_len, capacity)

    def core_config(self) -> CoreConfig:
        return CoreConfig.of(self)
