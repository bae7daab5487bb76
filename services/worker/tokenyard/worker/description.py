"""Who a worker is and what it serves: the answer to Describe and the model card it registers with."""

from __future__ import annotations

from dataclasses import dataclass

from tokenyard.common.discovery import ModelCard
from tokenyard.worker.engines.base import EngineInfo


@dataclass(frozen=True, slots=True)
class WorkerDescription:
    worker_id: int
    role: str
    """aggregated, prefill or decode."""
    model: str
    tokenizer: str
    engine: EngineInfo
    reasoning_parser: str = ""
    tool_call_parser: str = ""
    structured_output: tuple[str, ...] = ()
    """The guided decoding kinds the engine honours."""

    def model_card(self) -> ModelCard:
        return ModelCard(
            model=self.model,
            tokenizer=self.tokenizer,
            block_size=self.engine.block_size,
            context_length=self.engine.context_length,
            total_kv_blocks=self.engine.total_kv_blocks,
            engine=self.engine.kind,
            role=self.role,
            reasoning_parser=self.reasoning_parser,
            tool_call_parser=self.tool_call_parser,
            structured_output=self.structured_output,
        )
