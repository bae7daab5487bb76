"""The tokenizer inside a GGUF model file, converted to a Hugging Face ``tokenizer.json``.

A GGUF file keeps its vocabulary in the header's key-value metadata (``tokenizer.ggml.*``), ahead of
the weights. Reading it with ``gguf.GGUFReader`` memory-maps the file, so the weights are never read,
but parsing ~100k strings takes about two seconds; the converted files are therefore cached under a
key that hashes the metadata bytes alone (see :func:`metadata_key`), which takes milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from tokenyard.frontend.tokenizer import cache, hf
from tokenyard.frontend.tokenizer.errors import TokenizerError

log = logging.getLogger(__name__)

# Bump when the conversion changes, so that caches built by older code are not reused.
CONVERTER_VERSION = 1

# llama.cpp names the pre-tokenizer of a BPE vocabulary in `tokenizer.ggml.pre`; these use GPT-2's
# regex after splitting every digit on its own (llama.cpp: "\p{N}" then the GPT-2 expression).
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_GPT2 = frozenset({"gpt-2"})

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFVocab:
    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def metadata_key(path: Path) -> str:
    """SHA-256 of the file's header and key-value metadata (where the vocabulary lives), not of the weights."""
    try:
        with (
            path.open("rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
            memoryview(mapped) as view,
        ):
            end = _metadata_end(view)
            digest = hashlib.sha256(f"tokenyard-gguf-tokenizer-v{CONVERTER_VERSION}\n".encode())
            digest.update(view[:end])
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file
        raise TokenizerError(f"{path}: cannot read GGUF file: {exc}") from exc
    return digest.hexdigest()


def _metadata_end(view: memoryview) -> int:
    """Offset just past the key-value section, found by skipping over every value without decoding it."""
    if bytes(view[:4]) != b"GGUF":
        raise TokenizerError("not a GGUF file (bad magic)")
    (version,) = _U32.unpack_from(view, 4)
    if version not in (2, 3):
        raise TokenizerError(f"unsupported GGUF version {version}")
    (count,) = _U64.unpack_from(view, 16)
    offset = 24
    try:
        for _ in range(count):
            offset = _skip_string(view, offset)
            (kind,) = _U32.unpack_from(view, offset)
            offset = _skip_value(view, offset + 4, kind)
    except struct.error as exc:
        raise TokenizerError("truncated GGUF metadata") from exc
    if offset > len(view):
        raise TokenizerError("truncated GGUF metadata")
    return offset


def _skip_string(view: memoryview, offset: int) -> int:
    length: int = _U64.unpack_from(view, offset)[0]
    return offset + 8 + length


def _skip_value(view: memoryview, offset: int, kind: int) -> int:
    if kind in _SCALAR_SIZES:
        return offset + _SCALAR_SIZES[kind]
    if kind == _STRING:
        return _skip_string(view, offset)
    if kind == _ARRAY:
        (item_kind,) = _U32.unpack_from(view, offset)
        count: int = _U64.unpack_from(view, offset + 4)[0]
        offset += 12
        if item_kind in _SCALAR_SIZES:
            return offset + count * _SCALAR_SIZES[item_kind]
        for _ in range(count):
            offset = _skip_value(view, offset, item_kind)
        return offset
    raise TokenizerError(f"unknown GGUF value type {kind}")


def read_vocab(path: Path) -> GGUFVocab:
    try:
        reader = gguf.GGUFReader(path, "r")
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: cannot read GGUF file: {exc}") from exc
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        return default if field is None else field.contents()

    model = get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.model)")
    return GGUFVocab(
        model=str(model),
        pre=get("tokenizer.ggml.pre"),
        tokens=list(get("tokenizer.ggml.tokens", [])),
        token_types=[int(t) for t in get("tokenizer.ggml.token_type", [])],
        merges=list(get("tokenizer.ggml.merges", [])),
        bos_id=get("tokenizer.ggml.bos_token_id"),
        eos_id=get("tokenizer.ggml.eos_token_id"),
        pad_id=get("tokenizer.ggml.padding_token_id"),
        unk_id=get("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
        chat_template=get("tokenizer.chat_template"),
    )


def to_hf(vocab: GGUFVocab, where: str) -> tuple[Backend, dict[str, Any]]:
    """The ``tokenizers`` equivalent of a GGUF byte-level BPE vocabulary, and its tokenizer_config."""
    if vocab.model != "gpt2":
        raise TokenizerError(
            f"{where}: tokenizer.ggml.model {vocab.model!r} is not supported (only 'gpt2', byte-level BPE)"
        )
    pre_tokenizer: pre_tokenizers.PreTokenizer
    if vocab.pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif vocab.pre in _GPT2:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        known = ", ".join(sorted(_DIGITS_THEN_GPT2 | _GPT2))
        raise TokenizerError(f"{where}: tokenizer.ggml.pre {vocab.pre!r} is not supported (known: {known})")
    if len(vocab.token_types) not in (0, len(vocab.tokens)):
        raise TokenizerError(f"{where}: tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")

    ids: dict[str, int] = {}
    for i, token in enumerate(vocab.tokens):
        ids.setdefault(token, i)  # a duplicated string keeps its first id, as llama.cpp's lookup does
    pairs: list[tuple[str, str]] = []
    for merge in vocab.merges:
        left, sep, right = merge.partition(" ")
        if not sep or " " in right:
            raise TokenizerError(f"{where}: malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    backend = Backend(models.BPE(vocab=ids, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()

    token_type = gguf.TokenType
    special = {int(token_type.CONTROL), int(token_type.UNKNOWN)}
    added = [
        AddedToken(vocab.tokens[i], special=kind in special, normalized=False)
        for i, kind in enumerate(vocab.token_types)
        if kind in special or kind == int(token_type.USER_DEFINED)
    ]
    backend.add_tokens(added)

    def text(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None and 0 <= token_id < len(vocab.tokens) else None

    bos, eos = text(vocab.bos_id), text(vocab.eos_id)
    prefix = [bos] if vocab.add_bos and bos is not None else []
    suffix = [eos] if vocab.add_eos and eos is not None else []
    if prefix or suffix:

        def sequence(piece: str, type_id: int) -> list[str]:
            return [f"{t}:{type_id}" for t in [*prefix, piece, *suffix]]

        backend.post_processor = processors.TemplateProcessing(
            single=sequence("$A", 0),
            pair=sequence("$A", 0) + sequence("$B", 1),
            special_tokens=[(t, ids[t]) for t in dict.fromkeys([*prefix, *suffix])],
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": text(vocab.pad_id),
        "unk_token": text(vocab.unk_id),
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    return backend, {k: v for k, v in config.items() if v is not None}


def load_gguf(path: Path, cache_root: Path | None = None) -> hf.HFTokenizer:
    """The tokenizer of a GGUF file: from the cache when this metadata was converted before, else
    converted now and cached (a cache that cannot be written only costs the next start time)."""
    if not path.is_file():
        raise TokenizerError(f"{path}: no such GGUF file")
    key = metadata_key(path)
    cached = cache.tokenizer_dir(key, cache_root)
    name = f"gguf:{path}"
    if (cached / "tokenizer.json").is_file():
        try:
            return hf.load_model_dir(cached, name=name)
        except TokenizerError as exc:
            log.warning("replacing a broken tokenizer cache entry %s: %s", cached, exc)
            shutil.rmtree(cached, ignore_errors=True)
    log.info("converting the tokenizer of %s (cached in %s)", path, cached)
    backend, config = to_hf(read_vocab(path), name)
    try:
        cache.store_atomically(
            cached,
            {
                "tokenizer.json": backend.to_str(),
                "tokenizer_config.json": json.dumps(
                    {**config, "source": str(path)}, ensure_ascii=False, indent=2
                ),
            },
        )
    except OSError as exc:
        log.warning("cannot cache the tokenizer of %s in %s: %s", path, cached, exc)
    return hf.HFTokenizer(backend, config, name)
