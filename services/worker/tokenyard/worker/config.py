"""Worker settings (env prefix ``TOKENYARD_WORKER_``).

The KV geometry (block size, blocks per rank, context length) is not a worker setting: it belongs
to the engine, which reports it once started (``Engine.info()``), and the model card is built from
that report. For the mocker it is set through the nested ``mocker`` group (``--mocker-block-size``,
``TOKENYARD_WORKER_MOCKER__BLOCK_SIZE``, ...), so one knob decides both the engine's paging and the
hashing that routers and frontends use.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tokenyard.common.settings import MetricsPortSettings, ServiceSettings, settings_config
from tokenyard.worker.engines.base import EngineRole
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.engines.registry import EngineKind
from tokenyard.worker.engines.vllm.config import VllmEngineConfig

# The worker's role is its engine's: one enum, named for where it is set.
WorkerRole = EngineRole


class WorkerSettings(MetricsPortSettings, ServiceSettings):
    model_config = settings_config("worker")
    service_name: ClassVar[str] = "worker"

    port: int = Field(default=8300, ge=0, le=65535, description="gRPC port (worker, health, reflection).")
    metrics_port: int = Field(
        default=9300, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint."
    )
    engine: EngineKind = Field(
        default=EngineKind.MOCKER,
        description="Engine behind this worker: mocker (simulated, no model), cpu (PyTorch on the CPU), "
        "vllm (vLLM's engine; needs the vllm extra).",
    )
    role: WorkerRole = Field(default=WorkerRole.AGGREGATED, description="aggregated, prefill or decode.")
    model: str = Field(
        default="SmolLM2-135M-Instruct", min_length=1, description="Model name served to clients."
    )
    tokenizer: str = Field(
        default="smollm2",
        min_length=1,
        description="Tokenizer and chat template the frontend uses for this model (published in the model card).",
    )
    reasoning_parser: Literal["", "think", "deepseek_r1"] = Field(
        default="",
        description=(
            "How the frontend separates this model's reasoning from its answer (published in the "
            "model card): think = <think>...</think> in the output (Qwen3 style); deepseek_r1 = the "
            "template opens the block, the output starts inside it. Empty: no reasoning."
        ),
    )
    tool_call_parser: Literal["", "hermes"] = Field(
        default="",
        description=(
            "How the frontend finds tool calls in this model's output (published in the model card): "
            'hermes = <tool_call>{"name": ..., "arguments": ...}</tool_call>. Empty: none.'
        ),
    )
    kv_event_buffer: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="KV events kept per dp_rank so that a resubscribing router can resume instead of "
        "taking a snapshot.",
    )
    kv_subscriber_queue: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="KV events queued per subscriber; a subscriber that falls further behind is resynced "
        "with a fresh snapshot.",
    )
    load_interval: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Seconds between load snapshots on KV event streams (and idle forward-pass heartbeats).",
    )
    max_in_flight: int = Field(
        default=0,
        ge=0,
        description="Generate calls admitted at once; more are refused with RESOURCE_EXHAUSTED. 0: no limit.",
    )
    kv_fetch_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Seconds a decode worker gives a prefill worker to stream a prompt's KV blocks; past it "
        "(or on any other failure of the fetch) the decode worker computes the prompt itself.",
    )
    standby_lock: str = Field(
        default="",
        description="Lock file shared with standby workers: the worker holding it serves; the others "
        "load their engine, then wait without registering and take over when it dies. Empty: serve "
        "at once.",
    )
    respawn: bool = Field(
        default=False,
        description="Run as a template that imports the engine once and forks the worker, again each time "
        "it dies: a crashed worker is serving again without paying for the interpreter and the imports "
        "(with --cpu-gms, in a fraction of a second). Restarts back off after the first; SIGTERM stops "
        "the worker gracefully and then the template.",
    )
    mocker: MockerConfig = Field(
        default_factory=MockerConfig, description="Simulated engine (used when --engine mocker)."
    )
    cpu: CpuEngineConfig = Field(
        default_factory=CpuEngineConfig, description="Real model on the CPU (used when --engine cpu)."
    )
    vllm: VllmEngineConfig = Field(
        default_factory=VllmEngineConfig, description="vLLM's engine (used when --engine vllm)."
    )
