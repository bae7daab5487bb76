"""Tokenizers in the Hugging Face format (``tokenizer.json``, optionally with ``tokenizer_config.json``),
run by the ``tokenizers`` library. Every other source (GGUF files, the builtin byte vocabulary) is
converted to this format."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from tokenyard.frontend.tokenizer.chat_template import ChatTemplate
from tokenyard.frontend.tokenizer.errors import ChatTemplateError, TokenizerError
from tokenyard.frontend.tokenizer.large import (
    CACHED_TEXT_CHARS,
    LARGE_TEXT_CHARS,
    PieceCache,
    cuts_safely,
    encode_in_pieces,
)
from tokenyard.frontend.tokenizer.protocol import SpecialToken, SpecialTokens

# Used when the files name no end-of-sequence token (a bare tokenizer.json); first match wins.
_EOS_GUESSES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<eos>", "<|end|>")


class HFTokenizer:
    """A :class:`~tokenyard.frontend.tokenizer.protocol.Tokenizer` backed by ``tokenizers``."""

    def __init__(self, backend: Backend, config: Mapping[str, Any], name: str) -> None:
        self._backend = backend
        self._name = name
        self._special = _special_tokens(backend, config, name)
        template = _template_source(config)
        self._template: ChatTemplate | None = None
        if template is not None:
            strings = {
                f"{role}_token": token.text
                for role, token in (
                    ("bos", self._special.bos),
                    ("eos", self._special.eos),
                    ("pad", self._special.pad),
                    ("unk", self._special.unk),
                )
                if token is not None
            }
            try:
                self._template = ChatTemplate(template, strings)
            except TokenizerError as exc:
                raise TokenizerError(f"{name}: {exc}") from exc
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # Whether long texts may be encoded in pieces; probed on the first long text.
        self._cuts_safely: bool | None = None
        self.pieces = PieceCache()

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._special

    @property
    def eos_token_id(self) -> int:
        return self._special.eos.id

    @property
    def bos_token_id(self) -> int | None:
        return None if self._special.bos is None else self._special.bos.id

    @property
    def pad_token_id(self) -> int | None:
        return None if self._special.pad is None else self._special.pad.id

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def chat_template(self) -> str | None:
        return None if self._template is None else self._template.source

    def encode(self, text: str, add_special_tokens: bool = False) -> Sequence[int]:
        if len(text) >= CACHED_TEXT_CHARS:
            if self._cuts_safely is None:
                self._cuts_safely = cuts_safely(self._backend)
            if self._cuts_safely:
                if len(text) >= LARGE_TEXT_CHARS:
                    return encode_in_pieces(self._backend, text, add_special_tokens)
                return self.pieces.encode(self._backend, text, add_special_tokens)
        ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(
            ids if isinstance(ids, list) else list(ids), skip_special_tokens=skip_special_tokens
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        *,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        if self._template is None:
            raise ChatTemplateError(f"the tokenizer {self._name} has no chat template")
        return self._template.render(messages, add_generation_prompt, tools, template_kwargs)


def from_json_text(text: str, config: Mapping[str, Any], name: str) -> HFTokenizer:
    try:
        backend = Backend.from_str(text)
    except Exception as exc:  # the Rust side raises plain Exception with a serde message
        raise TokenizerError(f"{name}: not a valid tokenizer.json: {exc}") from exc
    return HFTokenizer(backend, config, name)


def load_tokenizer_json(path: Path) -> HFTokenizer:
    """A ``tokenizer.json`` file; the ``tokenizer_config.json`` beside it is used when present."""
    if (path.parent / "tokenizer_config.json").is_file():
        return load_model_dir(path.parent, tokenizer_file=path, name=str(path))
    return from_json_text(_read_text(path), {}, str(path))


def load_model_dir(path: Path, *, tokenizer_file: Path | None = None, name: str | None = None) -> HFTokenizer:
    """A Hugging Face model directory: ``tokenizer.json``, ``tokenizer_config.json`` and, for newer
    models, the chat template in ``chat_template.jinja``."""
    tokenizer_file = tokenizer_file or path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json in this directory")
    config: dict[str, Any] = {}
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        try:
            loaded = json.loads(_read_text(config_file))
        except json.JSONDecodeError as exc:
            raise TokenizerError(f"{config_file}: not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise TokenizerError(f"{config_file}: expected a JSON object")
        config = loaded
    template_file = path / "chat_template.jinja"
    if "chat_template" not in config and template_file.is_file():
        config["chat_template"] = _read_text(template_file)
    return from_json_text(_read_text(tokenizer_file), config, name or str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _template_source(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates ("default", "tool_use", ...): the default one drives chat.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _special_tokens(backend: Backend, config: Mapping[str, Any], name: str) -> SpecialTokens:
    def lookup(text: str | None) -> SpecialToken | None:
        if text is None:
            return None
        token_id = backend.token_to_id(text)
        return None if token_id is None else SpecialToken(token_id, text)

    def named(key: str) -> SpecialToken | None:
        value = config.get(key)
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        return lookup(value) if isinstance(value, str) else None

    eos = named("eos_token")
    for guess in _EOS_GUESSES:
        if eos is not None:
            break
        eos = lookup(guess)
    if eos is None:
        raise TokenizerError(
            f"{name}: cannot tell the end-of-sequence token (no eos_token in tokenizer_config.json)"
        )
    ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
    return SpecialTokens(
        eos=eos,
        bos=named("bos_token"),
        pad=named("pad_token"),
        unk=named("unk_token"),
        im_start=lookup("<|im_start|>"),
        im_end=lookup("<|im_end|>"),
        ids=ids,
    )
