"""The model folder vLLM loads: a Hugging Face directory, converted once from a GGUF file.

vLLM cannot load SmolLM2's GGUF file itself (it probes a JSON config at the model path), so a GGUF
model is converted the way the CPU engine converts it (:mod:`tokenyard.worker.engines.cpu.model`:
dequantized, quantization state dropped, saved with safetensors, config, tokenizer and chat
template) into the same cache: the CPU engine and vLLM share one converted copy, and only the
first start of either pays for the conversion.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tokenyard.worker.engines.cpu.model import ModelLoadError, convert_gguf, locate_weights
from tokenyard.worker.engines.vllm.config import VllmEngineConfig

log = logging.getLogger(__name__)

SETTING = "--vllm-model-path / TOKENYARD_WORKER_VLLM__MODEL_PATH"


@dataclass(frozen=True, slots=True)
class ModelFolder:
    path: Path
    converted: bool
    """True when this call converted a GGUF file (the slow, first-start path)."""
    seconds: float
    eos_token_ids: tuple[int, ...]


def prepare_weights(config: VllmEngineConfig) -> ModelFolder:
    """The folder to hand vLLM, converting a GGUF file on first use; blocking (seconds when converting)."""
    started = time.perf_counter()
    folder, gguf_file = locate_weights(config.model_path, config.cache_dir, SETTING)
    converted = False
    if gguf_file is not None and not (folder / "config.json").is_file():
        log.info("converting %s into %s for vLLM (first start only)", gguf_file, folder)
        try:
            convert_gguf(gguf_file, folder)
        except OSError as exc:
            raise ModelLoadError(f"cannot convert {gguf_file} into {folder}: {exc}") from exc
        converted = True
    model_config = _read_json(folder / "config.json")
    if gguf_file is not None and "quantization_config" in model_config:
        # vLLM would try to load the dequantized tensors as GGUF-quantized ones.
        raise ModelLoadError(
            f"{folder} still declares a quantization_config; delete the folder so that it is converted again"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelLoadError(f"{folder} holds no weights (*.safetensors or *.bin); set {SETTING}")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        # Guided decoding compiles its grammars over vLLM's tokenizer, which comes from here.
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    generation = _read_json(folder / "generation_config.json")
    eos = _ids(generation.get("eos_token_id")) or _ids(model_config.get("eos_token_id"))
    return ModelFolder(folder, converted, time.perf_counter() - started, eos)


def _read_json(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return doc if isinstance(doc, dict) else {}


def _ids(value: object) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(dict.fromkeys(v for v in values if isinstance(v, int) and not isinstance(v, bool)))
