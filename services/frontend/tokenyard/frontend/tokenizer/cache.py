"""Where converted tokenizers are kept between starts: ``$TOKENYARD_CACHE/tokenizers/<key>/``
(default ``${XDG_CACHE_HOME:-~/.cache}/tokenyard``), never next to the model, whose folder may be
read-only (site-packages, an image layer)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("TOKENYARD_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenyard"


def tokenizer_dir(key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "tokenizers" / key


def store_atomically(target: Path, files: Mapping[str, str]) -> None:
    """Writes ``files`` into the directory ``target`` so that readers see all of them or none.

    The directory is filled under a temporary name and renamed into place; when another process
    got there first, its copy (identical, the key being a content hash) is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; these files hold nothing secret
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
