"""The model folder vLLM loads: SmolLM2's GGUF file is converted once, in the same cache the CPU
engine uses, and later starts find it ready."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tokenyard.worker.engines.cpu.model import ModelLoadError
from tokenyard.worker.engines.vllm.config import VllmEngineConfig
from tokenyard.worker.engines.vllm.weights import prepare_weights


async def test_the_gguf_file_is_converted_once(tmp_path: Path) -> None:
    config = VllmEngineConfig(cache_dir=tmp_path)
    first = await asyncio.to_thread(prepare_weights, config)
    started = time.perf_counter()
    second = await asyncio.to_thread(prepare_weights, config)
    again_s = time.perf_counter() - started
    assert first.converted and not second.converted
    assert first.path == second.path and first.path.parent == tmp_path
    assert again_s < 2.0 < first.seconds
    model_config = json.loads((first.path / "config.json").read_text())
    assert "quantization_config" not in model_config
    assert list(first.path.glob("*.safetensors")) and (first.path / "tokenizer.json").is_file()
    assert (first.path / "chat_template.jinja").is_file() or "chat_template" in (
        first.path / "tokenizer_config.json"
    ).read_text()
    assert first.eos_token_ids == (2,)


async def test_an_unknown_model_names_the_vllm_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="--vllm-model-path"):
        await asyncio.to_thread(prepare_weights, VllmEngineConfig(model_path=str(tmp_path / "nope")))
